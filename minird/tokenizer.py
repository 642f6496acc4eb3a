"""
Huginn's tokenizer, from a checkpoint folder in the official layout (see minird.pretrained), with
the `tokenizers` package alone (no transformers):

    tokenizer.json           the BPE itself; its post-processor puts <|begin_text|> ... <|end_text|>
                             around encoded text when add_special_tokens=True (the official README
                             encodes a prompt that way and drops the <|end_text|>)
    tokenizer_config.json    bos/eos/pad token names and the chat template (jinja)
    generation_config.json   eos_token_id: the ids that end generation (with the official stop tokens)

Huginn's chat format, as the official converter (evaluate_raven/checkpoint_to_hf_converter.py)
uploads it with the model, written out in chat_prompt below:

    <|begin_text|><|begin_header|>system<|end_header|>\\n\\nYou are ...<|end_turn|>
    <|begin_header|>user<|end_header|>\\n\\nHello!<|end_turn|><|begin_header|>Huginn<|end_header|>\\n\\n

(no line breaks but the \\n\\n after each header). This is minird.data.CharTokenizer's counterpart
for a real checkpoint; minird's own toy models use that one.
"""

import json
import os

from tokenizers import Tokenizer

from minird.pretrained import checkpoint_folder

BEGIN_TEXT, END_TEXT = "<|begin_text|>", "<|end_text|>"
BEGIN_HEADER, END_HEADER, END_TURN = "<|begin_header|>", "<|end_header|>", "<|end_turn|>"
ASSISTANT = "Huginn"  # the template names the assistant's turns so, whether given as "assistant" or "Huginn"
# The official generation stops on these whatever generation_config.json says (its _get_stops
# hard-codes their Huginn-0125 ids 65504, 65505, 65508); here they are looked up by name.
STOP_TOKENS = (BEGIN_TEXT, END_TEXT, END_TURN)


def chat_prompt(messages, add_generation_prompt=False, bos_token=BEGIN_TEXT):
    """Huginn's chat format for messages [{"role": ..., "content": ...}, ...]: each message is a
    header with its role and its stripped content ended by <|end_turn|>, the first preceded by
    bos_token; then the header of the assistant's turn to come (add_generation_prompt), or
    <|end_text|> for a finished conversation."""
    text = bos_token if messages else ""
    for message in messages:
        role = ASSISTANT if message["role"] in ("assistant", ASSISTANT) else message["role"]
        text += f"{BEGIN_HEADER}{role}{END_HEADER}\n\n{message['content'].strip()}{END_TURN}"
    return text + (f"{BEGIN_HEADER}{ASSISTANT}{END_HEADER}\n\n" if add_generation_prompt else END_TEXT)


class HuginnTokenizer:
    """tokenizer.json through `tokenizers`, with the special tokens and stop token ids of the
    checkpoint. encode and decode default as transformers' do (special tokens added and kept)."""

    def __init__(self, tokenizer, bos_token, eos_token, pad_token, stop_token_ids, chat_template=None):
        self.tokenizer = tokenizer
        self.bos_token, self.eos_token, self.pad_token = bos_token, eos_token, pad_token
        self.stop_token_ids = stop_token_ids  # sorted ids: generation ends after any of them
        self.chat_template = chat_template  # the checkpoint's jinja text, which chat_prompt implements

    @classmethod
    def from_pretrained(cls, path_or_hub_id):
        folder = checkpoint_folder(path_or_hub_id)
        path = os.path.join(folder, "tokenizer.json")
        if not os.path.isfile(path):
            raise ValueError(f"no tokenizer.json in {folder}")
        tokenizer = Tokenizer.from_file(path)
        config = read_optional_json(folder, "tokenizer_config.json")
        eos_token = token_text(config.get("eos_token", END_TEXT))
        stops = {tokenizer.token_to_id(name) for name in STOP_TOKENS + (eos_token,)}
        eos_ids = read_optional_json(folder, "generation_config.json").get("eos_token_id", [])
        stops.update(eos_ids if isinstance(eos_ids, list) else [eos_ids])
        return cls(tokenizer, token_text(config.get("bos_token", BEGIN_TEXT)), eos_token,
                   token_text(config.get("pad_token")), sorted(stops - {None}), config.get("chat_template"))

    @property
    def vocab_size(self):
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token):
        return self.tokenizer.token_to_id(token)

    @property
    def bos_id(self):
        return self.token_to_id(self.bos_token)

    @property
    def eos_id(self):
        return self.token_to_id(self.eos_token)

    @property
    def pad_id(self):
        return self.token_to_id(self.pad_token) if self.pad_token is not None else None

    def encode(self, text, add_special_tokens=True):
        """Token ids of text; special tokens written in it (e.g. <|end_turn|>) are one id each."""
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids, skip_special_tokens=False):
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages, add_generation_prompt=False):
        """The conversation as text in Huginn's chat format (encode it with add_special_tokens=False:
        it starts with the bos token already)."""
        return chat_prompt(messages, add_generation_prompt, self.bos_token)


def token_text(token):
    """A special token as tokenizer_config.json gives it: its text, or {"content": text, ...}."""
    return token["content"] if isinstance(token, dict) else token


def read_optional_json(folder, name):
    path = os.path.join(folder, name)
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return json.load(f)
