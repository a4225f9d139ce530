"""Make tests/data/golden/optimus.{safetensors,json}: what the ORIGINAL Optimus code computes on tiny models.

CI cannot reach the original code, so tests/nn/test_optimus.py checks us against these files. They were made by

    python tests/golden/make_optimus_golden.py --original <checkout of SHI-Labs/Versatile-Diffusion @ cf0f4a2>

(torch 2.13 CPU, one thread; rerun the same command to regenerate). The script imports, from the checkout,
lib/model_zoo/optimus.py (optimus_vae_next, sample_single_sequence_conditional, top_k_top_p_filtering),
lib/model_zoo/optimus_models/ (BERT and GPT-2 with latent connectors, their tokenizers) and the function
remove_duplicate_word of app.py (read out of the file with `ast`: app.py itself needs gradio). Modules those
files import but do not use here are stubbed in sys.modules: the model registry (lib.model_zoo.common.*) and
`six`. Nothing of the original is copied into the outputs except what it computes.

What it does, all seeded:
  * tiny vocabularies written here by hand: a WordPiece vocab.txt of 64 pieces ([PAD]=0 [UNK] [CLS] [SEP]
    [MASK] ...) and a byte-level BPE vocab.json/merges.txt (the 256 byte tokens, merges spelling a few
    words, <|endoftext|>); the original tokenizers add <PAD> <BOS> <EOS> after it;
  * tiny configs shaped like configs/model/optimus.yaml (latent 16, width 32, 2 layers, 4 heads), every
    parameter redrawn from a seeded normal (LayerNorm weights around 1), wte[<EOS>] pushed along ln_f.bias so
    that some sentences stop at <EOS> before max_length;
  * encode: optimus_vae_next.encode(sentences) in fp32 and fp64, with the ids and mask its BERT received
    (caught by a forward pre-hook), i.e. the original's own tokenization;
  * decoder logits: the decoder on random ids with the latent as `past`, fp32 and fp64;
  * decoding: sample_single_sequence_conditional after torch.manual_seed(seed) for several temperatures,
    top_k, top_p, max_length (top_k=1 is greedy); optimus_vae_next.decode (strings) for one seed;
  * top_k_top_p_filtering on random and very peaked logits; GPT-2 decode strings of random id sequences;
    GPT-2 and BERT token ids of a few sentences; remove_duplicate_word on tricky strings.
"""

import argparse
import ast
import json
import sys
import tempfile
import types
from pathlib import Path

import torch
from safetensors.torch import save_file

OUT = Path(__file__).resolve().parents[1] / "data" / "golden"
LATENT = 16
EOS_LIFT = 0.9  # how far <EOS> is pushed along ln_f.bias: sentences of many lengths, some cut at max_length
SENTENCES = [
    "The cat sat on the mat.",
    "A man riding a horse on the street!",
    "a photo of a big red car, and a small blue house",
    "Café in New York?",
    "unknown wordz: xyz (qq) -- 42",
    "",
    " ".join(["the cat sat on the mat"] * 15),  # 90 pieces: truncated to 77
]
GPT2_WORDS = ["the", "The", "cat", "dog", "sat", "on", "mat", "a", "man", "do", "not", "is", "red", "in", "photo",
              "of", "house", "street", "riding", "horse", "big", "small", "and", "with", "car"]
GPT2_PIECES = [".", "!", ",", "'s", "n't", "'m", "'ve", "'re", "...", "Ġ'", "Ġ?"]
RDW_CASES = [
    "a cat a cat sat sat on the mat mat", "the the the", "hello", "", "(hello) (hello)", "hi. hi. hi.",
    "one two three one two three four", "a b a b a b c", "((x)) y y", "x (.", ". leading dot", "a . b . c",
    "end ] ] ] !", "[{(deep)}]", "what? what? what?", "a man riding a horse riding a horse on a street",
    "a, b, a, b,", "x y z x y z x y z w", "({ })", "so so. so so.",
]
FILTER_CASES = [(0, 1.0), (0, 0.0), (5, 0.0), (0, 0.9), (20, 0.5), (1, 0.0), (300, 1.0), (0, 0.3)]
SAMPLE_RUNS = [  # (seed, temperature, top_k, top_p, max_length)
    (0, 1.0, 0, 1.0, 30), (1, 1.0, 0, 1.0, 30), (2, 0.7, 0, 1.0, 30), (3, 1.3, 10, 0.0, 30),
    (4, 1.0, 0, 0.9, 30), (5, 1.0, 20, 0.8, 12), (6, 2.0, 0, 1.0, 5), (7, 1.0, 0, 1.0, 2),
]
GREEDY_RUNS = [(30, 1.0), (8, 1.0), (30, 0.5)]  # (max_length, temperature), run as top_k=1


def import_original(root: Path) -> dict:
    """The original modules, with the registry and `six` stubbed."""
    def module(name: str, path: Path | None = None, **attrs) -> types.ModuleType:
        m = types.ModuleType(name)
        if path is not None:
            m.__path__ = [str(path)]
        m.__dict__.update(attrs)
        sys.modules[name] = m
        return m

    def build(cfg, verbose=True):  # the registry's get_model()(cfg): here every cfg is already built
        return cfg

    module("six", PY2=False, PY3=True)
    module("lib", root / "lib")
    module("lib.model_zoo", root / "lib" / "model_zoo")
    module("lib.model_zoo.common", root / "lib" / "model_zoo" / "common")
    module("lib.model_zoo.common.get_model", get_model=lambda: build, register=lambda name: (lambda c: c))
    module("lib.model_zoo.common.utils")
    import lib.model_zoo.optimus as optimus  # noqa: E402  (the real file, through the stub packages)

    tree = ast.parse((root / "app.py").read_text())
    fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "remove_duplicate_word")
    scope: dict = {}
    exec(compile(ast.Module(body=[fn], type_ignores=[]), "app.py", "exec"), scope)
    return {"optimus": optimus, "remove_duplicate_word": scope["remove_duplicate_word"]}


def byte_tokens() -> list[str]:
    """GPT-2's printable stand-ins for the 256 bytes, in byte order (the well-known bytes_to_unicode table)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return [table[b] for b in range(256)]


def tiny_vocabs() -> tuple[list[str], dict[str, int], list[tuple[str, str]]]:
    bert = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", ",", "!", "?", "'", "(", ")", "-", ":",
            "a", "the", "cat", "dog", "sat", "on", "mat", "is", "red", "blue", "house", "with", "and", "of", "in",
            "man", "riding", "horse", "photo", "street", "big", "small", "car", "café", "new", "york",
            "The", "Cat", "New", "York", "Café", "##s", "##ing", "##ed", "##z", "##e", "un", "##known", "word",
            "x", "##y", "##q", "q", "4", "##2", "y", "z", "##x", "b", "c"]
    assert len(bert) == 64 and len(set(bert)) == 64
    tokens = byte_tokens()
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = []
    for word in [*("Ġ" + w for w in GPT2_WORDS), *GPT2_WORDS, *GPT2_PIECES]:
        piece = word[0]
        for ch in word[1:]:
            if (piece, ch) not in merges:
                merges.append((piece, ch))
                vocab.setdefault(piece + ch, len(vocab))
            piece += ch
    vocab["<|endoftext|>"] = len(vocab)
    return bert, vocab, merges


def tiny_models(n_bert: int, n_gpt2: int, eos: int):
    from lib.model_zoo.optimus_models.optimus_bert import BertForLatentConnector_XX
    from lib.model_zoo.optimus_models.optimus_gpt2 import GPT2ForLatentConnector_XX

    ns = types.SimpleNamespace
    bert_cfg = ns(vocab_size=n_bert, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=64, hidden_act="gelu", max_position_embeddings=96, type_vocab_size=2,
                  layer_norm_eps=1e-12, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1,
                  initializer_range=0.02, output_attentions=False, output_hidden_states=False, pruned_heads={},
                  torchscript=False)
    gpt2_cfg = ns(vocab_size=n_gpt2, n_embd=32, hidden_size=32, n_layer=2, n_head=4, n_positions=40, n_ctx=40,
                  layer_norm_epsilon=1e-5, latent_size=LATENT, attn_pdrop=0.1, embd_pdrop=0.1, resid_pdrop=0.1,
                  initializer_range=0.02, output_attentions=False, output_hidden_states=False, pruned_heads={},
                  torchscript=False)
    torch.manual_seed(0)
    encoder = BertForLatentConnector_XX(bert_cfg, LATENT)
    decoder = GPT2ForLatentConnector_XX(gpt2_cfg, latent_size=LATENT)
    g = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for m in (encoder, decoder):
            for name, p in m.named_parameters():  # the tied lm_head comes once, as wte
                noise = torch.randn(p.shape, generator=g)
                if "LayerNorm.weight" in name or name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
                    p.copy_(1 + 0.1 * noise)
                elif name.endswith(("wte.weight", "ln_f.bias")):
                    p.copy_((0.2 if "wte" in name else 0.3) * noise)
                else:
                    p.copy_(0.1 * noise)
        t = decoder.transformer
        t.wte.weight[eos] += EOS_LIFT * t.ln_f.bias  # lift <EOS>'s logit so that some sentences end early
    return encoder, decoder


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--original", required=True, type=Path, help="checkout of SHI-Labs/Versatile-Diffusion @ cf0f4a2")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    torch.set_num_threads(1)
    orig = import_original(args.original.resolve())
    optimus = orig["optimus"]

    bert_vocab, gpt2_vocab, merges = tiny_vocabs()
    tmp = Path(tempfile.mkdtemp())
    (tmp / "vocab.txt").write_text("".join(p + "\n" for p in bert_vocab), encoding="utf-8")
    (tmp / "vocab.json").write_text(json.dumps(gpt2_vocab, ensure_ascii=False), encoding="utf-8")
    (tmp / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    tok_enc = optimus.optimus_bert_tokenizer(vocab_file=str(tmp / "vocab.txt"), do_lower_case=False, max_len=512)
    tok_dec = optimus.optimus_gpt2_tokenizer(vocab_file=str(tmp / "vocab.json"), merges_file=str(tmp / "merges.txt"),
                                             do_lower_case=False, max_len=1024)
    n_gpt2 = len(gpt2_vocab) + 3
    encoder, decoder = tiny_models(len(bert_vocab), n_gpt2, eos=len(gpt2_vocab) + 2)
    vae = optimus.optimus_vae_next(encoder, decoder, tok_enc, tok_dec, types.SimpleNamespace(latent_size=LATENT)).eval()
    bos, eos = tok_dec.encode("<BOS>")[0], tok_dec.encode("<EOS>")[0]
    assert [tok_dec.convert_tokens_to_ids("<PAD>"), bos, eos] == [n_gpt2 - 3, n_gpt2 - 2, n_gpt2 - 1]

    tensors = {f"state.{k}": v.detach().clone().contiguous() for k, v in vae.state_dict().items()
               if k.startswith(("encoder.", "decoder."))}
    meta: dict = {"bert_vocab": bert_vocab, "gpt2_vocab": gpt2_vocab, "gpt2_merges": merges,
                  "bos_id": bos, "eos_id": eos, "sentences": SENTENCES,
                  "config": {"latent_dim": LATENT, "enc_vocab": len(bert_vocab), "enc_dim": 32, "enc_layers": 2,
                             "enc_heads": 4, "enc_mlp_dim": 64, "enc_positions": 96, "dec_vocab": n_gpt2,
                             "dec_dim": 32, "dec_layers": 2, "dec_heads": 4, "dec_positions": 40}}

    # encode (the original's own tokenization, caught on its way into BERT)
    seen = {}
    hook = vae.encoder.register_forward_pre_hook(
        lambda m, a, kw: seen.update(ids=a[0].clone(), mask=kw["attention_mask"].clone()), with_kwargs=True)
    with torch.no_grad():
        tensors["encode.mu32"] = vae.encode(SENTENCES).contiguous()
        tensors["encode.ids"], tensors["encode.mask"] = seen["ids"], seen["mask"]
        tensors["encode.mu64"] = vae.double().encode(SENTENCES).contiguous()
        vae.float()
    hook.remove()

    # teacher-forced decoder logits
    g = torch.Generator().manual_seed(5)
    z = torch.randn(3, LATENT, generator=g)
    ids = torch.randint(0, n_gpt2, (3, 9), generator=g)
    ids[:, 0] = bos
    tensors["z"], tensors["logits.ids"] = z, ids
    with torch.no_grad():
        tensors["logits32"] = vae.decoder(input_ids=ids, past=z)[0].contiguous()
        tensors["logits64"] = vae.decoder.double()(input_ids=ids, past=z.double())[0].contiguous()
        vae.float()

    # decoding: ids from the original sampler, strings from optimus_vae_next.decode
    context = torch.tensor([bos])

    def run(seed, temperature, top_k, top_p, max_length):
        torch.manual_seed(seed)
        return [optimus.sample_single_sequence_conditional(
            model=vae.decoder, context=context, past=zi, temperature=temperature, top_k=top_k, top_p=top_p,
            eos_token=eos, max_length=max_length).tolist() for zi in z]

    meta["sample_runs"] = [{"seed": s, "temperature": t, "top_k": k, "top_p": p, "max_length": m,
                            "ids": run(s, t, k, p, m)} for s, t, k, p, m in SAMPLE_RUNS]
    meta["greedy_runs"] = [{"max_length": m, "temperature": t, "ids": run(0, t, 1, 0.0, m)} for m, t in GREEDY_RUNS]
    torch.manual_seed(11)
    meta["decode_seed"], meta["decode_strings"] = 11, vae.decode(z)

    # top_k_top_p_filtering, including a very peaked case where top_p = 1.0 drops a tail through rounding
    logits = torch.randn(4, 303, generator=g) * torch.tensor([[1.0], [3.0], [30.0], [300.0]])
    tensors["filter.logits"] = logits
    for i, (k, p) in enumerate(FILTER_CASES):
        tensors[f"filter.out{i}"] = torch.stack([optimus.top_k_top_p_filtering(l.clone(), top_k=k, top_p=p)
                                                 for l in logits])
    meta["filter_cases"] = FILTER_CASES

    # tokenizers: GPT-2 decode strings and ids, BERT ids of the sentences, remove_duplicate_word
    special = torch.tensor([n_gpt2 - 3, bos, eos])
    seqs = [[bos, *torch.randint(0, n_gpt2 - 3, (n,), generator=g).tolist(), eos] for n in (0, 1, 5, 12, 20)]
    seqs += [[bos, *torch.randint(0, n_gpt2, (12,), generator=g).tolist(), eos]]
    seqs += [[bos, *special.tolist(), eos]]
    words = ["Ġdo", "Ġnot", "n't", "'s", ".", "Ġthe", "Ġcat", "!", "Ġ", ",", "'m", "Ġ'", "'", "Ġ?"]
    seqs += [[bos, *(gpt2_vocab[w] for w in words), eos], [bos, gpt2_vocab["Ġ"], eos], [bos, eos]]
    meta["decode_cases"] = [  # what optimus_vae_next.decode does with the sampler's output
        {"ids": s, "text": " ".join(tok_dec.decode(s, clean_up_tokenization_spaces=True).split()[1:-1])} for s in seqs]
    gpt2_sentences = ["the cat sat on the mat.", " The dog isn't red!", "a photo of a house, with a car",
                      "I'm here... don't go", "Café 42 ünïcode"]
    meta["gpt2_encode"] = [{"text": s, "ids": tok_dec.encode(s)} for s in gpt2_sentences]
    meta["remove_duplicate_word"] = [{"text": s, "out": orig["remove_duplicate_word"](s)} for s in RDW_CASES]

    args.out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, args.out / "optimus.safetensors")
    (args.out / "optimus.json").write_text(json.dumps(meta, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    lengths = [len(r) for run_ in meta["sample_runs"] for r in run_["ids"]]
    print(f"wrote {args.out}: {len(tensors)} tensors; sampled lengths {lengths}")
    print("decode:", meta["decode_strings"])


if __name__ == "__main__":
    main()
