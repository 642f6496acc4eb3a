"""
Test-time compute experiments on the checkpoint that train_tiny.py writes (docs/ARCHITECTURE.md lists them):

    python -m minird.experiments adaptive    # steps each answer uses with adaptive exit, by hops
    python -m minird.experiments depth       # accuracy vs r = 1 ... 64, by hops (the depth-scaling table)
    python -m minird.experiments ccot        # steps per token decoded one at a time, with and without
                                             # continuous compute (s0 = the previous token's state)
    python -m minird.experiments latent      # the states s_1 ... s_r of answer tokens: PCA, convergence
    python -m minird.experiments baselines   # non-recurrent models (1 and 4 layers, r = 1) trained on
                                             # the same corpus, against the recurrent model at every r
    python -m minird.experiments kvshare     # answer accuracy and KV-cache bytes per token, full cache
                                             # vs compress-sN (N slots shared by the steps), at fixed r
    python -m minird.experiments speculative # self-speculative decoding: acceptance rate and tokens/s
                                             # against plain greedy decoding, same output
    python -m minird.experiments diffusion   # diffusion forcing against plain greedy decoding: tokens/s
                                             # and how many of its tokens are greedy's
    python -m minird.experiments depth --ckpt out-tiny/ckpt.pt --steps 1,4,16 --lines 128

Each prints a table and saves NAME.json (and NAME.png with matplotlib) next to the checkpoint.
docs/EXPERIMENTS.md has what each measured on the default checkpoint.

Every experiment reads the same held-out lines (minird.evaluate.held_out_sets): --lines lines of the training
distribution (hops 0 .. max_hops) and --lines lines with one query of max_hops + 1 ... max_hops +
--beyond hops (extrapolation). With --seed = train_tiny's seed + 10000 (11337 by default) they are
the lines of train_tiny's own final table.

One experiment a file (adaptive.py, depth.py, ...), each with run(model, corpus, sets, args) ->
report, show(report) and plot(report, path, plt); __main__.py is the command line.
"""
