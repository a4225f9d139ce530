"""The Optimus text VAE (vd.nn.optimus, vd.optimus_tokenizers, weights_convert.optimus).

Parity with the original SHI-Labs code goes through goldens: tests/golden/make_optimus_golden.py ran the
original on tiny random models and vocabularies and stored weights, inputs and outputs in
tests/data/golden/optimus.{safetensors,json}. Here we load the same weights through our converter and compare.
"""

import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from manifests import read_manifest
from vd.nn.optimus import VD_OPTIMUS, OptimusConfig, OptimusVAE, filter_logits
from vd.optimus_tokenizers import OptimusTokenizers, remove_duplicate_word
from weights_convert.optimus import WHY_CAUSAL_MASK, WHY_TIED_HEAD, route
from helpers import GOLDEN

def convert(state: dict[str, torch.Tensor], prefix: str = "") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """`route` over a whole Optimus state dict under `prefix` -> (our state dict, {ignored key: reason}); keys it
    does not route (outside the prefix: other components of a full-model file) are left out."""
    ours, ignored = {}, {}
    for key, tensor in state.items():
        r = route(key, prefix)
        if isinstance(r, str):
            ignored[key] = r
        elif r is not None:
            ours[r[1]] = tensor
    return ours, ignored


class Golden:
    def __init__(self):
        from safetensors.torch import load_file

        self.meta = json.loads((GOLDEN / "optimus.json").read_text(encoding="utf-8"))
        self.t = load_file(GOLDEN / "optimus.safetensors")
        self.state = {k[len("state."):]: v for k, v in self.t.items() if k.startswith("state.")}


@pytest.fixture(scope="module")
def golden() -> Golden:
    return Golden()


@pytest.fixture(scope="module")
def vocab_dir(tmp_path_factory, golden) -> Path:
    """The tiny vocabularies of the goldens as files: vocab.txt, vocab.json, merges.txt."""
    d = tmp_path_factory.mktemp("optimus_vocab")
    m = golden.meta
    (d / "vocab.txt").write_text("".join(p + "\n" for p in m["bert_vocab"]), encoding="utf-8")
    (d / "vocab.json").write_text(json.dumps(m["gpt2_vocab"], ensure_ascii=False), encoding="utf-8")
    (d / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in m["gpt2_merges"]),
                                  encoding="utf-8")
    return d


@pytest.fixture(scope="module")
def tok(vocab_dir) -> OptimusTokenizers:
    return OptimusTokenizers.from_pretrained(bert=vocab_dir, gpt2=vocab_dir)


@pytest.fixture(scope="module")
def vae(golden) -> OptimusVAE:
    model = OptimusVAE(OptimusConfig(**golden.meta["config"])).eval()
    state, _ = convert(golden.state)
    model.load_state_dict(state, strict=True)
    return model


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.double() - b.double()).abs().max().item()


# ---- weights

def test_convert_golden_state(golden):
    ours, ignored = convert(golden.state)
    assert ignored == {"decoder.transformer.h.0.attn.bias": WHY_CAUSAL_MASK,
                       "decoder.transformer.h.1.attn.bias": WHY_CAUSAL_MASK, "decoder.lm_head.weight": WHY_TIED_HEAD}
    assert torch.equal(golden.state["decoder.lm_head.weight"], ours["decoder.transformer.wte.weight"])
    prefixed = {f"optimus.{k}": v for k, v in golden.state.items()} | {"model.diffusion_model.x": torch.zeros(1)}
    assert convert(prefixed, "optimus.")[0].keys() == ours.keys()
    assert route("lm.extra") is None and route("optimus.lm.extra", "optimus.") is None  # the loader refuses these
    # a stray key inside encoder.* / decoder.* goes through; the strict load names it
    with pytest.raises(RuntimeError, match="encoder.extra"):
        OptimusVAE(OptimusConfig(**golden.meta["config"])).load_state_dict(
            convert({**golden.state, "encoder.extra": torch.zeros(1)})[0], strict=True)


def test_meta_build_then_assign_load(golden, check):
    """How the loader builds modules: on the meta device, then filled by assignment (no buffer left empty)."""
    with torch.device("meta"):
        model = OptimusVAE(OptimusConfig(**golden.meta["config"]))
    model.load_state_dict(convert(golden.state)[0], strict=True, assign=True)
    with torch.no_grad():
        mu = model.eval().encode(golden.t["encode.ids"], golden.t["encode.mask"])
    check(_max_diff(mu, golden.t["encode.mu32"]), 1e-5)


def test_full_size_manifest_on_meta():
    """Every key of optimus-vae.pth fills one of our parameters with its shape, or is ignored with a reason."""
    with torch.device("meta"):
        model = OptimusVAE(VD_OPTIMUS)
    assert not list(model.buffers())  # nothing a load could leave empty
    manifest = read_manifest("optimus-vae")
    n_ignored = 12 * 1024 * 1024 + 50260 * 768  # causal masks, tied lm_head
    assert sum(p.numel() for p in model.parameters()) == sum(math.prod(s) for s in manifest.values()) - n_ignored
    assert sum(p.numel() for p in model.parameters()) == 241_599_744
    for prefix in ("", "optimus.", "vae.text."):  # optimus-vae.pth, the deprecated full model, the current one
        state = {prefix + k: torch.empty(s, device="meta") for k, s in manifest.items()}
        ours, ignored = convert(state, prefix)
        assert len(ours) + len(ignored) == len(manifest)  # every key routed
        assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in model.state_dict().items()}
        assert sorted(ignored.values()) == [WHY_CAUSAL_MASK] * 12 + [WHY_TIED_HEAD]
        model.load_state_dict(ours, strict=True, assign=True)
    # the deprecated file as the manifests list it, other components and all
    deprecated = {k: torch.empty(s, device="meta") for k, s in read_manifest("vd-four-flow-v1-0-deprecated").items()}
    assert convert(deprecated, "optimus.")[0].keys() == model.state_dict().keys()


def test_parts_are_built_only_when_asked(golden):
    cfg = OptimusConfig(**golden.meta["config"])
    dec = OptimusVAE(cfg, frozenset({"decoder"}))
    assert not hasattr(dec, "encoder") and all(k.startswith("decoder.") for k in dec.state_dict())
    with pytest.raises(RuntimeError, match="without its encoder"):
        dec.encode(torch.ones(1, 3, dtype=torch.long), torch.ones(1, 3))
    with pytest.raises(RuntimeError, match="without its decoder"):
        OptimusVAE(cfg, frozenset({"encoder"})).generate(torch.zeros(1, cfg.latent_dim), 0, 1)
    with pytest.raises(ValueError, match="parts"):
        OptimusVAE(cfg, frozenset({"decoder", "lm_head"}))
    with pytest.raises(ValueError, match="enc_heads"):
        OptimusConfig(**{**golden.meta["config"], "enc_heads": 5})


# ---- parity with the original code

def test_encode_parity(golden, tok, vae, check):
    ids, mask = tok.encode_batch(golden.meta["sentences"])
    assert torch.equal(ids, golden.t["encode.ids"])  # the original's own tokenization, truncation and padding
    assert torch.equal(mask.float(), golden.t["encode.mask"])
    with torch.no_grad():
        check(_max_diff(vae.encode(ids, mask), golden.t["encode.mu32"]), 1e-5, "fp32")
        check(_max_diff(vae.double().encode(ids, mask), golden.t["encode.mu64"]), 1e-12, "fp64")
    vae.float()


def test_decoder_logits_parity(golden, vae, check):
    z, ids = golden.t["z"], golden.t["logits.ids"]
    with torch.no_grad():
        check(_max_diff(vae.decoder_logits(z, ids), golden.t["logits32"]), 1e-5, "fp32")
        check(_max_diff(vae.double().decoder_logits(z.double(), ids), golden.t["logits64"]), 1e-12, "fp64")
    vae.float()


def test_sampling_parity(golden, vae, check):
    """With a generator seeded as the original seeded the global RNG, every sentence has the same ids. (The draws
    are torch.multinomial's, which change between torch releases: the golden file is torch 2.13's, the release CI
    installs; torch 2.6 draws other tokens from the same generator.)"""
    m, z = golden.meta, golden.t["z"]
    mismatched = 0
    for run in m["sample_runs"]:
        ours = vae.generate(z, m["bos_id"], m["eos_id"], max_length=run["max_length"],
                            temperature=run["temperature"], top_k=run["top_k"], top_p=run["top_p"],
                            generator=torch.Generator().manual_seed(run["seed"]))
        mismatched += sum(a != b for a, b in zip(ours, run["ids"]))
    check(mismatched, 0, "sentences with other ids")
    lengths = {len(s) for run in m["sample_runs"] for s in run["ids"]}
    assert 2 in lengths and 30 in lengths and len(lengths) > 6  # <EOS> stops and max_length cuts both covered


def test_greedy_parity(golden, vae, check):
    """Greedy = the original sampler with top_k = 1 (one token left: the draw is the argmax)."""
    m, z = golden.meta, golden.t["z"]
    mismatched = 0
    for run in m["greedy_runs"]:
        ours = vae.generate(z, m["bos_id"], m["eos_id"], max_length=run["max_length"],
                            temperature=run["temperature"], greedy=True)
        mismatched += sum(a != b for a, b in zip(ours, run["ids"]))
    check(mismatched, 0, "sentences with other ids")


def test_decode_strings_parity(golden, tok, vae):
    """optimus_vae_next.decode end to end: sampling with its defaults, then detokenizing (torch 2.13's draws, as
    in test_sampling_parity)."""
    m = golden.meta
    ids = vae.generate(golden.t["z"], tok.bos_id, tok.eos_id, generator=torch.Generator().manual_seed(m["decode_seed"]))
    assert [tok.decode(s) for s in ids] == m["decode_strings"]


def test_filter_logits_parity(golden):
    logits = golden.t["filter.logits"]
    for i, (k, p) in enumerate(golden.meta["filter_cases"]):
        ours = torch.stack([filter_logits(row, k, p) for row in logits])
        assert torch.equal(ours, golden.t[f"filter.out{i}"]), (k, p)
    # the original's top_p = 1.0 quirk is really exercised: rounding drops a tail token of row 1
    assert torch.isinf(filter_logits(logits[1], 0, 1.0)).sum() == 1


def test_tokenizer_parity(golden, tok):
    m = golden.meta
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (m["bos_id"] - 1, m["bos_id"], m["eos_id"])
    for case in m["decode_cases"]:
        assert tok.decode(case["ids"]) == case["text"], case["ids"]
    for case in m["gpt2_encode"]:  # both libraries read the same vocab.json / merges.txt the same way
        # (the original GPT-2 tokenizer strips a text, then puts one space before it)
        assert tok.gpt2.encode(" " + case["text"].strip()) == case["ids"], case["text"]


def test_remove_duplicate_word_parity(golden):
    for case in golden.meta["remove_duplicate_word"]:
        assert remove_duplicate_word(case["text"]) == case["out"], case["text"]


# ---- our own behaviour

def test_kv_cache_matches_recomputation(golden, vae, check):
    """Incremental decoding (one token at a time, past cached) equals running the whole prefix each step."""
    m, z = golden.meta, golden.t["z"]
    for greedy, seed in ((True, 0), (False, 3)):
        fast = vae.generate(z, m["bos_id"], m["eos_id"], greedy=greedy, generator=torch.Generator().manual_seed(seed))
        gen = torch.Generator().manual_seed(seed)
        for zi, want in zip(z, fast):
            ids = [m["bos_id"]]
            while True:  # no cache: the whole prefix through decoder_logits every step
                logits = filter_logits(vae.decoder_logits(zi[None], torch.tensor([ids]))[0, -1], 0, 1.0)
                ids.append(int(logits.argmax()) if greedy
                           else int(torch.multinomial(torch.softmax(logits, -1), 1, generator=gen)))
                if ids[-1] == m["eos_id"] or len(ids) >= 30:
                    ids[-1] = m["eos_id"]
                    break
            assert ids == want
    # and the logits themselves, step by step against teacher forcing
    t = vae.decoder.transformer
    ids = golden.t["logits.ids"]
    with torch.no_grad():
        cache, emb, steps = t.latent_cache(z), t.linear_emb(z), []
        for i in range(ids.shape[1]):
            logits, cache = vae.decoder(ids[:, i:i + 1], emb, cache)
            steps.append(logits)
        check(_max_diff(torch.cat(steps, dim=1), vae.decoder_logits(z, ids)), 1e-5, "fp32")


@pytest.mark.parametrize("kwargs, error, match", [
    ({"temperature": 0.0}, ValueError, "temperature"),
    ({"temperature": -1}, ValueError, "temperature"),
    ({"temperature": True}, ValueError, "temperature"),
    ({"top_k": -1}, ValueError, "top_k"),
    ({"top_k": 2.5}, ValueError, "top_k"),
    ({"top_p": -0.1}, ValueError, "top_p"),
    ({"top_p": 1.5}, ValueError, "top_p"),
    ({"max_length": 1}, ValueError, "max_length"),
    ({"max_length": 41}, ValueError, "max_length"),  # past the 40 positions of the tiny decoder
    ({"max_length": 10.0}, ValueError, "max_length"),
    ({"bos_id": -1}, ValueError, "bos_id"),
    ({"eos_id": 10_000}, ValueError, "eos_id"),
    ({"greedy": "yes"}, TypeError, "greedy"),
    ({"z": torch.zeros(16)}, ValueError, r"z: expected a tensor of shape \[B, 16\]"),
    ({"z": torch.zeros(2, 8)}, ValueError, "z"),
    ({"z": [[0.0] * 16]}, ValueError, "z"),
])
def test_generate_argument_errors(golden, vae, kwargs, error, match):
    args = {"z": torch.zeros(1, 16), "bos_id": golden.meta["bos_id"], "eos_id": golden.meta["eos_id"], **kwargs}
    with pytest.raises(error, match=match):
        vae.generate(args.pop("z"), args.pop("bos_id"), args.pop("eos_id"), **args)


def test_shape_errors(vae):
    with pytest.raises(ValueError, match="input_ids"):
        vae.decoder_logits(torch.zeros(2, 16), torch.zeros(3, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="T < 40"):
        vae.decoder_logits(torch.zeros(2, 16), torch.zeros(2, 40, dtype=torch.long))
    with pytest.raises(ValueError, match="input_ids, attention_mask"):
        vae.encode(torch.ones(2, 4, dtype=torch.long), torch.ones(2, 5))


def test_tokenizer_behaviour(golden, tok, vocab_dir):
    bert = golden.meta["bert_vocab"]
    ids, mask = tok.encode_batch(["The Cat", "the cat sat", "café"])
    assert ids.tolist() == [[2, bert.index("the"), bert.index("cat"), 3, 0],  # lowercased, though "The" exists
                            [2, bert.index("the"), bert.index("cat"), bert.index("sat"), 3],
                            [2, bert.index("café"), 3, 0, 0]]  # accents kept (cased BERT does not strip them)
    assert mask.tolist() == (ids > 0).long().tolist()
    long_ids, _ = tok.encode_batch("a " * 100)
    assert long_ids.shape == (1, 79) and long_ids[0, -1] == 3  # 77 pieces between [CLS] and [SEP]
    with pytest.raises(ValueError, match="sentences"):
        tok.encode_batch([])
    n = len(golden.meta["gpt2_vocab"])
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (n, n + 1, n + 2)
    the, cat = (golden.meta["gpt2_vocab"][w] for w in ("Ġthe", "Ġcat"))
    assert tok.decode([tok.bos_id, the, cat, tok.eos_id]) == "the cat"  # first and last word dropped
    files = OptimusTokenizers.from_files(vocab_dir / "vocab.txt", vocab_dir / "vocab.json", vocab_dir / "merges.txt")
    assert files.encode_batch("A dog!")[0].tolist() == tok.encode_batch("A dog!")[0].tolist()


def test_tokenizer_refuses_a_vocab_with_moved_special_tokens(golden, tmp_path):
    vocab = {**golden.meta["gpt2_vocab"], "<BOS>": 0}
    (tmp_path / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (tmp_path / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    (tmp_path / "vocab.txt").write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\n", encoding="utf-8")
    with pytest.raises(ValueError, match="gpt2 vocabulary"):
        OptimusTokenizers.from_pretrained(tmp_path, tmp_path)


def test_tokenizers_from_hub_ids(monkeypatch, vocab_dir):
    """Hub ids go through hf_hub_download (stubbed here: no network), one file at a time."""
    import huggingface_hub

    asked = []
    def fake_download(repo: str, name: str) -> str:
        asked.append((repo, name))
        return str(vocab_dir / name)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    OptimusTokenizers.from_pretrained()
    assert asked == [("bert-base-cased", "vocab.txt"), ("gpt2", "vocab.json"), ("gpt2", "merges.txt")]


def test_remove_duplicate_word_behaviour():
    assert remove_duplicate_word("a dog a dog runs runs.") == "a dog runs."
    assert remove_duplicate_word("a  b  b") == "a  b"  # empty words (the original raises) are kept as words


def test_does_not_import_diffusers():
    code = textwrap.dedent('''
        import sys, torch
        from vd.nn.optimus import OptimusConfig, OptimusVAE
        import vd.optimus_tokenizers, weights_convert.optimus
        cfg = OptimusConfig(latent_dim=4, enc_vocab=10, enc_dim=8, enc_layers=1, enc_heads=2, enc_mlp_dim=8,
                            enc_positions=8, dec_vocab=10, dec_dim=8, dec_layers=1, dec_heads=2, dec_positions=8)
        m = OptimusVAE(cfg).eval()
        m.encode(torch.tensor([[2, 5, 3]]), torch.ones(1, 3))
        m.generate(torch.zeros(2, 4), 8, 9, max_length=4)
        sys.exit(1 if any(k == "diffusers" or k.startswith("diffusers.") for k in sys.modules) else 0)
    ''')
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
