"""Optimus, VD's text VAE: a BERT encoder to a 768-d latent and a GPT-2 decoder that writes a sentence from it.

Mirrors `optimus_vae_next` of the original code (SHI-Labs/Versatile-Diffusion@cf0f4a2,
lib/model_zoo/optimus.py and optimus_models/optimus_{bert,gpt2}.py). Parameter names are those of
`optimus-vae.pth`, so its state dict loads strictly once the causal-mask buffers and the tied
`decoder.lm_head.weight` are dropped (weights_convert/optimus.py). The encoder
is transformers' BertModel; the decoder is a small GPT-2 of our own, because the latent enters it in two ways
transformers' GPT-2 has no place for:
  memory     linear(z) [B, layers*dim] is cut into one chunk per layer, used as a one-token past key AND
             value of that layer (before the head split), so real tokens start at position 1;
  embedding  linear_emb(z) [B, dim] is added to every token's input embedding.
"""

import math
from typing import NoReturn
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn


OPTIMUS_PARTS = frozenset({"encoder", "decoder"})
Cache = list[tuple[Tensor, Tensor]]  # per decoder layer: keys, values [B, heads, S, head_dim]


@dataclass(frozen=True)
class OptimusConfig:
    latent_dim: int
    # encoder: BERT (erf-GELU, post-norm)
    enc_vocab: int
    enc_dim: int
    enc_layers: int
    enc_heads: int
    enc_mlp_dim: int
    enc_positions: int
    # decoder: GPT-2 (tanh-GELU, pre-norm, MLP 4 x dim) with its vocabulary grown by <PAD> <BOS> <EOS>
    dec_vocab: int
    dec_dim: int
    dec_layers: int
    dec_heads: int
    dec_positions: int
    enc_type_vocab: int = 2
    enc_norm_eps: float = 1e-12
    dec_norm_eps: float = 1e-5

    def __post_init__(self):
        for dim, heads, what in ((self.enc_dim, self.enc_heads, "enc"), (self.dec_dim, self.dec_heads, "dec")):
            if heads < 1 or dim % heads:
                raise ValueError(f"OptimusConfig: {what}_dim={dim} cannot be split into {what}_heads={heads} heads")


# bert-base-cased + GPT-2 small, latent 768 (configs/model/optimus.yaml of the original)
VD_OPTIMUS = OptimusConfig(latent_dim=768, enc_vocab=28996, enc_dim=768, enc_layers=12, enc_heads=12,
                           enc_mlp_dim=3072, enc_positions=512, dec_vocab=50260, dec_dim=768, dec_layers=12,
                           dec_heads=12, dec_positions=1024)


def _bert(cfg: OptimusConfig) -> nn.Module:
    """transformers' BertModel (with pooler) plus Optimus' bias-free `linear`: pooled -> [mu, logvar]."""
    from transformers import BertConfig, BertModel  # here, not at import: transformers is slow to import

    bert = BertModel(BertConfig(
        vocab_size=cfg.enc_vocab, hidden_size=cfg.enc_dim, num_hidden_layers=cfg.enc_layers,
        num_attention_heads=cfg.enc_heads, intermediate_size=cfg.enc_mlp_dim, hidden_act="gelu",
        max_position_embeddings=cfg.enc_positions, type_vocab_size=cfg.enc_type_vocab,
        layer_norm_eps=cfg.enc_norm_eps, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
    # compat: the original keeps the latent head inside its BERT module, hence the key encoder.linear.weight
    bert.linear = nn.Linear(cfg.enc_dim, 2 * cfg.latent_dim, bias=False)
    # transformers keeps constant position / token-type id buffers out of the state dict, so a meta-device
    # build would leave them empty after loading; encode() passes both id tensors instead
    del bert.embeddings.position_ids, bert.embeddings.token_type_ids
    return bert


class Conv1D(nn.Module):
    """GPT-2's linear layer: the weight is stored (in, out), transposed relative to nn.Linear."""

    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(d_in, d_out))
        self.bias = nn.Parameter(torch.zeros(d_out))
        nn.init.normal_(self.weight, std=0.02)

    def forward(self, x: Tensor) -> Tensor:
        return torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight).view(*x.shape[:-1], -1)


class GPT2Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.c_attn = Conv1D(dim, 3 * dim)
        self.c_proj = Conv1D(dim, dim)

    def forward(self, x: Tensor, past: tuple[Tensor, Tensor]) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        t = x.shape[1]
        q, k, v = (rearrange(y, "b t (h d) -> b h t d", h=self.heads) for y in self.c_attn(x).chunk(3, dim=-1))
        k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)  # (B, nh, S, hd)
        s = k.shape[2]
        # query i sits at position s - t + i and sees keys 0 .. s - t + i (the latent's slot 0 included);
        # a single new token sees everything, so incremental decoding needs no mask
        mask = None if t == 1 else torch.ones(t, s, dtype=torch.bool, device=x.device).tril(s - t)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.c_proj(rearrange(y, "b h t d -> b t (h d)")), (k, v)


class GPT2MLP(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.c_fc = Conv1D(dim, 4 * dim)
        self.c_proj = Conv1D(4 * dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))


class GPT2Block(nn.Module):
    def __init__(self, dim: int, heads: int, eps: float):
        super().__init__()
        self.ln_1 = nn.LayerNorm(dim, eps=eps)
        self.attn = GPT2Attention(dim, heads)
        self.ln_2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = GPT2MLP(dim)

    def forward(self, x: Tensor, past: tuple[Tensor, Tensor]) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        a, kv = self.attn(self.ln_1(x), past)
        x = x + a
        return x + self.mlp(self.ln_2(x)), kv


class LatentGPT2(nn.Module):
    """The original's GPT2Model_XX: GPT-2 plus the two latent projections (`linear`, `linear_emb`)."""

    def __init__(self, cfg: OptimusConfig):
        super().__init__()
        self.dim, self.heads = cfg.dec_dim, cfg.dec_heads
        self.wte = nn.Embedding(cfg.dec_vocab, cfg.dec_dim)
        self.wpe = nn.Embedding(cfg.dec_positions, cfg.dec_dim)
        self.h = nn.ModuleList([GPT2Block(cfg.dec_dim, cfg.dec_heads, cfg.dec_norm_eps) for _ in range(cfg.dec_layers)])
        self.ln_f = nn.LayerNorm(cfg.dec_dim, eps=cfg.dec_norm_eps)
        self.linear = nn.Linear(cfg.latent_dim, cfg.dec_dim * cfg.dec_layers, bias=False)  # per-layer memory
        self.linear_emb = nn.Linear(cfg.latent_dim, cfg.dec_dim, bias=False)  # added to every embedding

    def latent_cache(self, z: Tensor) -> Cache:
        """The latent as a one-token past: chunk l of linear(z) is layer l's key and its value."""
        chunks = self.linear(z).split(self.dim, dim=-1)  # dec_layers x (B, C)
        memory = [rearrange(c, "b (h d) -> b h 1 d", h=self.heads) for c in chunks]  # (B, nh, 1, hd)
        return [(m, m) for m in memory]

    def forward(self, ids: Tensor, z_emb: Tensor, cache: Cache) -> tuple[Tensor, Cache]:
        """ids [B, T] following the S positions in `cache` -> (hidden states [B, T, C], cache grown by T)."""
        s = cache[0][0].shape[2]
        pos = torch.arange(s, s + ids.shape[1], device=ids.device)
        # parity: word + position embeddings first, then the latent's; the original's dropout is a no-op here
        x = self.wte(ids) + self.wpe(pos) + z_emb[:, None]
        new_cache = []
        for block, past in zip(self.h, cache):
            x, kv = block(x, past)
            new_cache.append(kv)
        return self.ln_f(x), new_cache


class LatentGPT2Decoder(nn.Module):
    """The original's GPT2ForLatentConnector_XX; its lm_head is wte (tied), so it holds no weight of its own."""

    def __init__(self, cfg: OptimusConfig):
        super().__init__()
        self.transformer = LatentGPT2(cfg)

    def forward(self, ids: Tensor, z_emb: Tensor, cache: Cache) -> tuple[Tensor, Cache]:
        h, cache = self.transformer(ids, z_emb, cache)
        return F.linear(h, self.transformer.wte.weight), cache  # logits [B, T, V]


class OptimusVAE(nn.Module):
    """Sentences <-> 768-d text latents. Build only the parts you need: image-to-text needs only the decoder."""

    def __init__(self, cfg: OptimusConfig, parts: frozenset[str] = OPTIMUS_PARTS):
        super().__init__()
        if not parts <= OPTIMUS_PARTS:
            raise ValueError(f"parts must be a subset of {sorted(OPTIMUS_PARTS)}, got {sorted(parts)}")
        self.config, self.parts = cfg, frozenset(parts)
        if "encoder" in parts:
            self.encoder = _bert(cfg)
        if "decoder" in parts:
            self.decoder = LatentGPT2Decoder(cfg)

    def encode(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Token ids [B, T] of `[CLS] ... [SEP]` (right-padded, mask = id > 0) -> the posterior mean [B, latent].

        The latent is mu, never a sample, as `optimus_vae_next.encode` does; text latents are not rescaled."""
        self._require("encoder")
        if input_ids.dim() != 2 or attention_mask.shape != input_ids.shape:
            fail("input_ids, attention_mask", f"shapes {tuple(input_ids.shape)}, {tuple(attention_mask.shape)}",
                 "two tensors of the same shape [B, T]")
        positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
        pooled = self.encoder(input_ids, attention_mask=attention_mask.long(), position_ids=positions,
                              token_type_ids=torch.zeros_like(input_ids)).pooler_output  # tanh(dense(h_CLS))
        mu, _logvar = self.encoder.linear(pooled).chunk(2, dim=-1)
        return mu

    def decoder_logits(self, z: Tensor, input_ids: Tensor) -> Tensor:
        """Teacher-forced next-token logits [B, T, V] for token ids [B, T] (usually starting with <BOS>).

        No padding mask: attention is causal, so right padding never changes the logits of earlier tokens."""
        self._require("decoder")
        z = self._check_z(z)
        n_pos = self.config.dec_positions
        if input_ids.dim() != 2 or input_ids.shape[0] != z.shape[0] or input_ids.shape[1] >= n_pos:
            fail("input_ids", f"shape {tuple(input_ids.shape)}",
                 f"[{z.shape[0]}, T] (one row per latent, T < {n_pos}: the latent takes position 0)")
        t = self.decoder.transformer
        logits, _ = self.decoder(input_ids, t.linear_emb(z), t.latent_cache(z))
        return logits

    @torch.no_grad()
    def generate(self, z: Tensor, bos_id: int, eos_id: int, *, max_length: int = 30, temperature: float = 1.0,
                 top_k: int = 0, top_p: float = 1.0, greedy: bool = False,
                 generator: torch.Generator | None = None) -> list[list[int]]:
        """One sentence of token ids per latent, from <BOS> to <EOS> included (what `OptimusTokenizers.decode` reads).

        Sampling follows the original's `sample_single_sequence_conditional`: logits / temperature, top-k (if
        > 0) then nucleus (if top_p > 0) filtering, one `torch.multinomial` draw per token, latents one after
        the other; so a generator seeded like the global RNG draws what the original draws. greedy takes the
        argmax instead. A sentence stops at <EOS>; one that reaches max_length tokens gets its last token
        replaced by <EOS>. The defaults are those of the original `decode` (VD's text outputs).
        """
        self._require("decoder")
        z = self._check_z(z)
        vocab = self.config.dec_vocab
        for name, value in (("bos_id", bos_id), ("eos_id", eos_id)):
            if not _is_int(value) or not 0 <= value < vocab:
                fail(name, value, f"a token id in [0, {vocab})")
        if not _is_int(max_length) or not 2 <= max_length <= self.config.dec_positions:
            fail("max_length", max_length, f"an int in [2, {self.config.dec_positions}]")
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
            fail("temperature", temperature, "a number > 0")
        if not _is_int(top_k) or top_k < 0:
            fail("top_k", top_k, "an int >= 0 (0: no top-k filtering)")
        if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 <= top_p <= 1:
            fail("top_p", top_p, "a number in [0, 1] (0: no nucleus filtering)")
        if not isinstance(greedy, bool):
            fail("greedy", greedy, "a bool", TypeError)
        return [self._generate_one(zi[None], bos_id, eos_id, max_length, temperature, top_k, top_p, greedy, generator)
                for zi in z]

    def _generate_one(self, z: Tensor, bos: int, eos: int, max_length: int, temperature: float, top_k: int,
                      top_p: float, greedy: bool, generator: torch.Generator | None) -> list[int]:
        t = self.decoder.transformer
        z_emb, cache = t.linear_emb(z), t.latent_cache(z)
        ids = [bos]
        while True:
            new = torch.tensor([ids[-1:]], device=z.device)
            logits, cache = self.decoder(new, z_emb, cache)  # only the new token runs; the past is cached
            logits = filter_logits(logits[0, -1] / temperature, top_k, top_p)
            if greedy:
                token = int(logits.argmax())
            else:
                probs = F.softmax(logits, dim=-1)  # drawn where the generator lives: a CPU seed means the same anywhere
                where = generator.device if generator is not None else probs.device
                token = int(torch.multinomial(probs.to(where), 1, generator=generator))
            ids.append(token)
            if token == eos:
                return ids
            if len(ids) >= max_length:
                ids[-1] = eos  # parity: the original overwrites the last sampled token
                return ids

    def _check_z(self, z: Tensor) -> Tensor:
        if not isinstance(z, Tensor) or z.dim() != 2 or z.shape[1] != self.config.latent_dim or z.shape[0] == 0:
            fail("z", f"shape {tuple(z.shape)}" if isinstance(z, Tensor) else z,
                 f"a tensor of shape [B, {self.config.latent_dim}]")
        return z.to(self.decoder.transformer.linear.weight.dtype)

    def _require(self, part: str) -> None:
        if part not in self.parts:
            raise RuntimeError(f"this OptimusVAE was built without its {part} (parts={sorted(self.parts)})")


def filter_logits(logits: Tensor, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """Top-k, then nucleus (Holtzman et al. 2019) filtering of 1-D logits: dropped tokens get -inf.

    Same semantics as the original's `top_k_top_p_filtering`: top_k = 0 and top_p = 0 switch a filter off."""
    logits = logits.clone()
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
        logits[logits < kth] = -math.inf
    if top_p > 0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cum = F.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        # parity: drop where the mass before a token already exceeds top_p (strict '>', shifted by one so the
        # token crossing the threshold stays). Even top_p = 1.0 filters: rounding can lift the cumulative sum
        # just above 1 and drop a tail of (near-zero) tokens, exactly as in the original
        drop = torch.zeros_like(cum, dtype=torch.bool)
        drop[1:] = cum[:-1] > top_p
        logits[order[drop]] = -math.inf
    return logits


def fail(name: str, got: object, expected: str, error: type[Exception] = ValueError) -> NoReturn:
    raise error(f"{name}: expected {expected}, got {got!r}")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
