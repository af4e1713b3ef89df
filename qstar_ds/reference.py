"""The slow, obviously-right reference for the learn pass (used by tests and benchmarks).

For every (row, stream) it builds the plain sequence

    x_1 .. x_i, <sot>, c_1 .. c_t, <eot>, x_{i+1} .. x_{i+K-1}        (padding removed)

and runs the unmodified HF backbone on it with an ordinary causal mask (attention implementation
`sdpa` or `eager`, HF's own masks; position ids 0, 1, 2, ... in that order, except that with
thought.talk_positions=resume <eot> and the talk inputs count again from x_i's position + 1),
one sequence at a time, and mixes with the base model's state from a separate plain run on x
(the states, or with model.mix_rule=prob the two next-token probabilities). Embedding lookup, the
mixing MLP, the output projection and every loss are written out here without the packed-pass
helpers.
"""
from __future__ import annotations

import contextlib
import math

import torch

from .config import ThoughtConfig


@contextlib.contextmanager
def attn_implementation(model, name: str):
    old = model.config._attn_implementation
    model.set_attn_implementation(name)
    try:
        yield
    finally:
        model.set_attn_implementation(old)


def _embed(qmodel, ids: list[int]) -> torch.Tensor:
    table = qmodel.base.get_input_embeddings().weight
    rows = []
    for tok in ids:
        if tok == qmodel.sot_id:
            rows.append(qmodel.thought_embeds[0])
        elif tok == qmodel.eot_id:
            rows.append(qmodel.thought_embeds[1])
        else:
            rows.append(table[tok])
    return torch.stack(rows)[None]                                             # (1, S, H)


def _logprob(qmodel, h: torch.Tensor, target: int, temperature: float = 1.0) -> torch.Tensor:
    head = qmodel.base.get_output_embeddings()
    z = h @ head.weight.T
    if head.bias is not None:
        z = z + head.bias
    z = z.clone()
    z[qmodel.sot_id] = float("-inf")
    z[qmodel.eot_id] = float("-inf")
    z = z.to(torch.promote_types(z.dtype, torch.float32)) / temperature
    return z[target] - torch.logsumexp(z, dim=0)


def _mix_weight(qmodel, hb: torch.Tensor, ht: torch.Tensor) -> torch.Tensor:
    lin1, _, lin2, _, lin3 = qmodel.mixing_head.net
    a = torch.relu(torch.cat([hb, ht]) @ lin1.weight.T + lin1.bias)
    a = torch.relu(a @ lin2.weight.T + lin2.bias)
    return (a @ lin3.weight.T + lin3.bias)[0]


def reference_pass(qmodel, cfg: ThoughtConfig, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   anchor: torch.Tensor, thoughts: torch.Tensor, attn: str = "sdpa") -> dict:
    """Same inputs as learn.learn_pass. Returns per-stream values for valid streams
    ({(b, m): {"thought_logp", "talk_logp", "read_logp", "mix_w"}}), base log-probs {(b, i): value}, rewards,
    the loss terms and the total loss (all differentiable)."""
    B, n = input_ids.shape
    t, K, r = cfg.thought_len, cfg.talk_len, cfg.n_thoughts
    backbone = qmodel.base.base_model
    streams, base = {}, {}
    with attn_implementation(qmodel.base, attn):
        for b in range(B):
            real = [i for i in range(n) if bool(attention_mask[b, i])]
            xs = [int(input_ids[b, i]) for i in real]
            hb = backbone(inputs_embeds=_embed(qmodel, xs)).last_hidden_state[0]   # (len, H)
            for j in range(len(real) - 1):
                if real[j + 1] == real[j] + 1:
                    base[(b, real[j])] = _logprob(qmodel, hb[j], xs[j + 1])
            for m in range(anchor.shape[1]):
                i = int(anchor[b, m])
                window = range(i, i + K + 1)
                if not all(k < n and bool(attention_mask[b, k]) for k in window):
                    continue  # talk window past the end or into padding: not counted
                j = real.index(i)
                c = [int(v) for v in thoughts[b, m]]
                seq = xs[:j + 1] + [qmodel.sot_id] + c + [qmodel.eot_id] + xs[j + 1:j + K]
                pos = list(range(j + 1 + 1 + t))                      # x_<=i, <sot>, c_1 .. c_t
                talk_start = j + 1 if cfg.talk_positions == "resume" else len(pos)
                pos += list(range(talk_start, talk_start + K))        # <eot>, x_{i+1} .. x_{i+K-1}
                h = backbone(inputs_embeds=_embed(qmodel, seq),
                             position_ids=torch.tensor([pos])).last_hidden_state[0]
                # h[j+1+s] is <sot> (s = 0) or c_s and predicts c_{s+1}
                th = torch.stack([_logprob(qmodel, h[j + 1 + s], c[s], cfg.policy_temperature)
                                  for s in range(t)])
                talk, read, ws = [], [], []
                for step in range(1, K + 1):
                    ht = h[j + t + 1 + step]          # <eot> for step 1, then x_{i+step-1}
                    z = _mix_weight(qmodel, hb[j + step - 1], ht)
                    read.append(_logprob(qmodel, ht, xs[j + step]))   # the thought's state alone
                    if qmodel.mix_rule == "hidden":                   # mix the states (= the logits)
                        w = z
                        mixed = (1 - w) * hb[j + step - 1] + w * ht
                        talk.append(_logprob(qmodel, mixed, xs[j + step]))
                    else:                                             # mix the two probabilities
                        w = 1 / (1 + torch.exp(-(z + math.log(qmodel.mix_init / (1 - qmodel.mix_init)))))
                        p_base = torch.exp(_logprob(qmodel, hb[j + step - 1], xs[j + step]))
                        talk.append(torch.log((1 - w) * p_base + w * torch.exp(read[-1])))
                    ws.append(w)
                streams[(b, m)] = {"thought_logp": th, "talk_logp": torch.stack(talk),
                                   "read_logp": torch.stack(read), "mix_w": torch.stack(ws)}

    scored = "read_logp" if cfg.reward == "read" else "talk_logp"
    rewards = {}
    for (b, m), v in streams.items():
        group = [streams[(b, mm)][scored].sum() for mm in range(m - m % r, m - m % r + r)
                 if (b, mm) in streams]
        rewards[(b, m)] = (v[scored].sum() - sum(group) / len(group)).detach()
    n_streams = max(len(streams), 1)
    talk_loss = -sum((v["talk_logp"].sum() for v in streams.values()), torch.tensor(0.0)) / (n_streams * K)
    read_loss = -sum((v["read_logp"].sum() for v in streams.values()), torch.tensor(0.0)) / (n_streams * K)
    reinforce = -sum(((rewards[k].clamp(min=0) if cfg.clip_negative_rewards else rewards[k])
                      * v["thought_logp"].sum() for k, v in streams.items()), torch.tensor(0.0)) / (n_streams * t)
    base_loss = -sum(base.values(), torch.tensor(0.0)) / max(len(base), 1)
    loss = cfg.w_talk * talk_loss + cfg.w_base * base_loss + cfg.beta * reinforce + cfg.w_read * read_loss
    return {"streams": streams, "base": base, "rewards": rewards, "loss": loss,
            "losses": {"talk": talk_loss, "base": base_loss, "reinforce": reinforce, "read": read_loss}}
