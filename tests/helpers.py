"""Shared test utilities: random weights far from any initialisation, tiny configs covering every layer kind, small
tokenizers (ours with a visual vocabulary, and one laid out as a DeepSeek release's)."""

import json
from pathlib import Path

import torch

from dsv4 import ModelArgs, Transformer

# tiny configs that together cover SWA-only, CSA and HCA layers, hash and learned routing, hc_mult 1 and 4
PARITY_CONFIGS = {
    "mixed": dict(),  # [swa, csa, hca, csa] + MTP; 1 hash layer
    "hc1": dict(hc_mult=1),
    "swa_only": dict(compress_ratios=[0, 0, 0, 0, 0]),
    "hca_only": dict(compress_ratios=[16, 16, 16, 16, 0], n_hash_layers=2),
    "csa_learned": dict(compress_ratios=[4, 4, 4, 4, 0], n_hash_layers=0),
    "window128": dict(window_size=128, hca_ratio=128, compress_ratios=[0, 4, 128, 4, 0], n_layers=4),
}


# for tests that torch.compile a model: 3 Sinkhorn iterations instead of 20 build the same graphs with a fraction of
# the unrolled kernels to generate and compile (cold, the compile tests take a third less time)
FEW_SINKHORN = dict(hc_sinkhorn_iters=3)


def tiny_args(**overrides) -> ModelArgs:
    return ModelArgs.from_name("tiny", **overrides)


@torch.no_grad()
def randomize(model: Transformer, seed: int = 0) -> Transformer:
    """Weights far from the reference's initialisation: non-uniform mHC mixing (a transposed comb shows),
    non-trivial norms, sinks, window position biases and router biases; scaled so 4 layers stay well conditioned."""
    g = torch.Generator().manual_seed(seed)

    def rand(shape):
        return torch.randn(shape, generator=g)

    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.copy_(1 + 0.1 * rand(p.shape))
        elif name.endswith(".fn"):
            p.copy_(0.2 * rand(p.shape))
        elif name.endswith(".base"):
            p.copy_(0.5 * rand(p.shape))
        elif name.endswith(".scale"):
            p.copy_(0.5 + torch.rand(p.shape, generator=g))
        elif name.endswith(("attn_sink", ".ape")):
            p.copy_(rand(p.shape))
        else:
            p.copy_(0.5 * p.shape[-1] ** -0.5 * rand(p.shape))
    for name, b in model.named_buffers():
        if name.endswith("gate.bias"):
            b.copy_(0.1 * rand(b.shape))
        elif name.endswith("tid2eid"):
            b.copy_(torch.rand(b.shape[0], model.args.n_routed_experts, generator=g).argsort(-1)[:, : b.shape[1]])
    return model


def random_model(seed: int = 0, **overrides) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(tiny_args(**overrides))
    model.init_weights()
    return randomize(model, seed).eval()


def random_ids(args: ModelArgs, batch: int, seq: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, args.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(seed))


def small_visual_vocab(step_codes: int = 16):
    """(a 512-token BPE trained on four standard-library files, the joint vocabulary with its 1,000 codes): the
    multimodal data tests' small setting."""
    from dsv4.data.corpus import stdlib_files
    from dsv4.tokenizers.multimodal import VisualVocab
    from dsv4.tokenizers.text import Tokenizer

    _, files = stdlib_files()
    tok = Tokenizer.train((f.read_text() for f in files[:4]), vocab_size=512, n_vis=4)
    return tok, VisualVocab.build(tok, codebook=1000, step_codes=step_codes)


RELEASE_EXAMPLES = Path(__file__).parent / "data" / "release_chat_examples.json"


def release_chat_tokens() -> list[str]:
    """The release's chat tokens after BOS and EOS (added to `release_tokenizer` as DeepSeek's tokenizer.json has
    them: not marked special)."""
    from dsv4.tokenizers.release_chat import LATEST_REMINDER, TASKS
    from dsv4.tokenizers.text import ASSISTANT, END_THINK, THINK, USER

    return [USER, ASSISTANT, THINK, END_THINK, LATEST_REMINDER, *TASKS.values()]


def release_tokenizer(path: Path) -> Path:
    """A tiny tokenizer laid out as DeepSeek's, written to path/tokenizer.json (with a tokenizer_config.json): BOS,
    EOS and pad at 0-2, then BPE merges trained on the release's worked chat examples, then the chat tokens. Returns
    path."""
    from tokenizers import AddedToken, decoders, models, pre_tokenizers, trainers
    from tokenizers import Tokenizer as RustTokenizer

    from dsv4.tokenizers.text import BOS, EOS, PAD

    tok = RustTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    texts = [c["expected"] for c in json.loads(RELEASE_EXAMPLES.read_text(encoding="utf-8"))["cases"]] * 3
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=600, special_tokens=[BOS, EOS, PAD],
                                                       show_progress=False,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.add_tokens([AddedToken(t, normalized=False) for t in release_chat_tokens()])
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizerFast",
                                                            "bos_token": BOS, "eos_token": EOS}))
    return path
