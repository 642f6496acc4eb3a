"""depth: teacher-forced answer accuracy at each r of --steps, per hop count, both held-out sets
(train_tiny.py's final table, on any checkpoint)."""

from minird.evaluate import depth_results, print_depth_table, save_depth_plot


def run(model, corpus, sets, args):
    return {"r_values": args.steps, "results": depth_results(model, sets, args.steps, corpus.max_hops + 1)}


def show(report):
    print("held-out answer accuracy (%) by hops (rows) and test-time steps r (columns)")
    print_depth_table(report["results"], report["r_values"])


def plot(report, path, plt):
    return save_depth_plot(report["results"], report["r_values"], path)
