"""The online layer every online stage shares (ppo, grpo, rloo, online_dpo):
prompt encoding, sampling `num_generations` responses per prompt into one `Rollout` batch, and
scoring it with a reward model and/or reward functions (`Scorer`).

Layout of a rollout batch, B = prompts x num_generations rows, prompt-major (row p*G + g is
response g to prompt p, so a group is G consecutive rows):

    input_ids, attention_mask  (B, P + W)  left-padded prompt | right-padded response [| score slot]
    responses, response_mask   (B, W)      True on real response tokens (EOS included)
    sampling_logps             (B, W)      the sampler's own log-prob of each token, when it samples
                                           in another dtype than the model (else None)

`models.logprobs.response_logps` reads every online log-prob from this layout.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from rlhfkit.data.collate import pad_batch
from rlhfkit.data.encode import encode_prompt, encode_prompt_completion
from rlhfkit.errors import DataError
from rlhfkit.rollout.generate import HFGenerator, SamplingParams


def encode_prompts(tokenizer, rows: list[dict], max_prompt_length: int) -> tuple[list[list[int]], list[dict], int]:
    """Prompt ids (the last `max_prompt_length` tokens; strings as-is, message lists through the
    chat template) for rows with a non-empty prompt; returns (ids, kept rows, skipped count)."""
    ids, kept, skipped = [], [], 0
    for row in rows:
        p = encode_prompt(tokenizer, row["prompt"])[-max_prompt_length:]
        if p:
            ids.append(p)
            kept.append(row)
        else:
            skipped += 1
    return ids, kept, skipped


@dataclass
class Rollout:
    """One batch of sampled responses (see the module docstring for the layout).

    context_length: P. ended: (B,) finished with EOS or a stop string. truncated: (B,) stopped by
    max_new_tokens. group_size: responses per prompt (G)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    responses: torch.Tensor
    response_mask: torch.Tensor
    context_length: int
    ended: torch.Tensor
    texts: list[str]
    rows: list[dict]
    group_size: int = 1
    truncated: torch.Tensor = field(default=None)
    pad_id: int = 0
    sampling_logps: torch.Tensor | None = None

    @property
    def lengths(self) -> torch.Tensor:
        """(B,) response tokens (EOS included)."""
        return self.response_mask.sum(-1)

    def to(self, device) -> "Rollout":
        """The same rollout with its tensors on `device`."""
        return dataclasses.replace(self, **{f.name: getattr(self, f.name).to(device) for f in dataclasses.fields(self)
                                            if isinstance(getattr(self, f.name), torch.Tensor)})

    def group_ids_of(self, idx: torch.Tensor) -> list[int]:
        """Group (prompt) id of rows `idx`: rows of one prompt share it in packed passes."""
        return [int(i) // self.group_size for i in idx.tolist()]


def generate_rollout(model, tokenizer, generator: HFGenerator, prompt_ids: list[list[int]], rows: list[dict],
                     params: SamplingParams, seed: int, device, num_generations: int = 1,
                     score_slot: bool = False) -> Rollout:
    """Sample `num_generations` responses per prompt and lay them out as a `Rollout`; with
    `score_slot` one pad column is appended to the responses (PPO puts the score there). A generator
    that `records_logps` (its own dtype, vLLM for a stage that corrects for it) also records each
    token's sampling log-prob (`Rollout.sampling_logps`)."""
    gen = generator.generate(model, prompt_ids, params, generator_seed=seed, num_generations=num_generations,
                             record_logps=generator.records_logps)
    truncated = ~gen.ended & (gen.response_mask.sum(-1) >= params.max_new_tokens)
    return lay_out(gen.prompt_ids, gen.response_ids, gen.response_mask, gen.ended, truncated, gen.texts,
                   [r for r in rows for _ in range(num_generations)], tokenizer.pad_token_id, device,
                   group_size=num_generations, score_slot=score_slot, sampling_logps=gen.sampling_logps)


def lay_out(prompt_ids: list[list[int]], responses: torch.Tensor, response_mask: torch.Tensor, ended: torch.Tensor,
            truncated: torch.Tensor, texts: list[str], rows: list[dict], pad: int, device, group_size: int = 1,
            score_slot: bool = False, sampling_logps: torch.Tensor | None = None) -> Rollout:
    """B prompts' ids and (B, W) right-padded responses -> a `Rollout` (the module docstring's layout)."""
    queries = pad_batch(prompt_ids, pad, side="left")
    extra = 1 if score_slot else 0
    responses = torch.nn.functional.pad(responses, (0, extra), value=pad)
    rmask = torch.nn.functional.pad(response_mask, (0, extra), value=False)
    if sampling_logps is not None:
        sampling_logps = torch.nn.functional.pad(sampling_logps, (0, extra)).to(device)
    return Rollout(
        input_ids=torch.cat([queries["input_ids"], responses], 1).to(device),
        attention_mask=torch.cat([queries["attention_mask"], rmask], 1).to(device),
        responses=responses.to(device), response_mask=rmask.to(device),
        context_length=queries["input_ids"].shape[1], ended=ended.to(device), texts=texts,
        rows=rows, group_size=group_size, truncated=truncated.to(device), pad_id=pad, sampling_logps=sampling_logps)


def data_reply(row: dict):
    """The response a row gives to imitate: `completion` (prompt_completion; a conversation's last reply)
    or `chosen` (preference); None for prompt-only rows."""
    return row.get("completion", row.get("chosen"))


def reply_ids(tokenizer, prompt, reply, source: str | None = None) -> list[int]:
    """The token ids of a data `reply` as the policy would sample them after `encode_prompt(prompt)`:
    the tokens that follow the prompt's ids in the encoded prompt + reply, through the first EOS (a
    chat template's end of turn; generation stops there too). The prompt's ids must be a prefix of the
    encoded pair (the tokens do not merge across the boundary): DataError naming the row if not. One
    assistant turn only."""
    if isinstance(reply, list) and len(reply) != 1:
        raise DataError(f"the response to imitate must be one assistant turn, got {len(reply)} messages",
                        source=source)
    p = encode_prompt(tokenizer, prompt)
    full = encode_prompt_completion(tokenizer, prompt, reply).input_ids
    if full[:len(p)] != p:
        raise DataError("the prompt's tokens change when its response follows (the chat template's generation "
                        "prompt is not a prefix of the rendered reply, or tokens merge across the boundary)",
                        source=source)
    ids = full[len(p):]
    eos = tokenizer.eos_token_id
    return ids[:ids.index(eos) + 1] if eos in ids else ids


def data_rollout(tokenizer, prompt_ids: list[list[int]], rows: list[dict], max_new_tokens: int, device) -> Rollout:
    """The rows' own responses (`data_reply`, encoded by `reply_ids`, cut to `max_new_tokens` as a sample
    would be) laid out like sampled ones: ended when the response ends with EOS within the budget,
    truncated when cut."""
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    full = [reply_ids(tokenizer, r["prompt"], data_reply(r), r.get("_source")) for r in rows]
    cut = [ids[:max_new_tokens] for ids in full]
    batch = pad_batch(cut, pad, side="right")
    ended = torch.tensor([bool(ids) and ids[-1] == eos for ids in cut])
    truncated = torch.tensor([len(ids) > max_new_tokens for ids in full])
    texts = [tokenizer.decode(ids[:-1] if e else ids, skip_special_tokens=True) for ids, e in zip(cut, ended.tolist())]
    return lay_out(prompt_ids, batch["input_ids"], batch["attention_mask"].bool(), ended, truncated, texts, rows, pad,
                   device)


def concat_rollouts(parts: list[Rollout], pad_id: int) -> Rollout:
    """One Rollout from several (same group size): prompts re-aligned to the widest prompt (left
    padding), responses to the widest response (right padding). Used to refill a batch."""
    if len(parts) == 1:
        return parts[0]
    P = max(r.context_length for r in parts)
    W = max(r.responses.shape[1] for r in parts)

    def lay(r: Rollout, t: torch.Tensor, value) -> torch.Tensor:
        left, right = P - r.context_length, W - r.responses.shape[1]
        return torch.nn.functional.pad(t, (left, right), value=value)

    return Rollout(
        input_ids=torch.cat([lay(r, r.input_ids, pad_id) for r in parts]),
        attention_mask=torch.cat([lay(r, r.attention_mask, False) for r in parts]),
        responses=torch.cat([torch.nn.functional.pad(r.responses, (0, W - r.responses.shape[1]), value=pad_id)
                             for r in parts]),
        response_mask=torch.cat([torch.nn.functional.pad(r.response_mask, (0, W - r.responses.shape[1]),
                                                         value=False) for r in parts]),
        context_length=P, ended=torch.cat([r.ended for r in parts]),
        texts=[t for r in parts for t in r.texts], rows=[x for r in parts for x in r.rows],
        group_size=parts[0].group_size, truncated=torch.cat([r.truncated for r in parts]), pad_id=pad_id,
        sampling_logps=None if parts[0].sampling_logps is None else torch.cat(
            [torch.nn.functional.pad(r.sampling_logps, (0, W - r.responses.shape[1])) for r in parts]))


def select_rows(ro: Rollout, idx: torch.Tensor) -> Rollout:
    """The rows `idx` of a rollout (whole groups, in order, for a consistent group layout)."""
    keep = idx.tolist()
    return Rollout(input_ids=ro.input_ids[idx], attention_mask=ro.attention_mask[idx],
                   responses=ro.responses[idx], response_mask=ro.response_mask[idx],
                   context_length=ro.context_length, ended=ro.ended[idx], texts=[ro.texts[i] for i in keep],
                   rows=[ro.rows[i] for i in keep], group_size=ro.group_size, truncated=ro.truncated[idx],
                   pad_id=ro.pad_id, sampling_logps=None if ro.sampling_logps is None else ro.sampling_logps[idx])


class Scorer:
    """Scores rollouts: the weighted sum of [a reward model] and reward functions.

    `reward_model(ids, mask) -> (B,)`: a normalised reward-model score on token ids in the policy's
    vocabulary (None without a reward model); `rm_tokenizer`: the reward model's own tokenizer when
    its vocabulary differs from the policy's (texts are then re-encoded for it)."""

    def __init__(self, tokenizer, reward_funcs, weights: list[float] | None, reward_model=None,
                 rm_tokenizer=None, batch_size: int = 32):
        self.tokenizer = tokenizer
        self.funcs = list(reward_funcs)
        self.reward_model = reward_model
        self.rm_tokenizer = rm_tokenizer
        self.batch_size = batch_size
        n_sources = len(self.funcs) + (reward_model is not None)
        self.weights = list(weights) if weights else [1.0] * n_sources

    @property
    def has_sources(self) -> bool:
        return bool(self.funcs) or self.reward_model is not None

    @torch.no_grad()
    def __call__(self, ro: Rollout) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(scores (B,), parts {source name: (B,) with NaN where a function said None})."""
        from rlhfkit.rollout.rewards import combine_rewards, score_completions

        parts: dict[str, torch.Tensor] = {}
        device = ro.input_ids.device
        if self.reward_model is not None:
            ids, mask = ro.input_ids, ro.attention_mask
            if self.rm_tokenizer is not None:  # the RM has its own tokenizer: re-encode the texts
                tok = self.rm_tokenizer
                enc = [encode_prompt_completion(tok, r["prompt"], t) for r, t in zip(ro.rows, ro.texts)]
                seqs = [e.input_ids if ended else e.input_ids[:-1] for e, ended in zip(enc, ro.ended.tolist())]
                batch = pad_batch(seqs, tok.pad_token_id, side="right")
                ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
            parts["reward_model"] = torch.cat([self.reward_model(ids[i:i + self.batch_size], mask[i:i + self.batch_size])
                                               for i in range(0, ids.shape[0], self.batch_size)]).float()
        if self.funcs:
            ids = [r[m].tolist() for r, m in zip(ro.responses.cpu(), ro.response_mask.cpu())]
            parts.update({k: v.to(device) for k, v in score_completions(
                self.funcs, prompts=[r["prompt"] for r in ro.rows], completions=ro.texts, completion_ids=ids,
                ended=ro.ended.tolist(), rows=ro.rows).items()})
        total, _ = combine_rewards(parts, self.weights)
        return total.to(device), parts


def source_metrics(parts: dict[str, torch.Tensor], prefix: str = "rewards/") -> dict[str, float]:
    """`<prefix><source>` (mean) and `<prefix><source>/std` over the rows each source applies to. The
    preference loops pass "scores/": their "rewards/" are the loss's implicit rewards."""
    out = {}
    for name, x in parts.items():
        vals = x[~torch.isnan(x)]
        if vals.numel():
            out[f"{prefix}{name}"] = vals.mean().item()
            out[f"{prefix}{name}/std"] = vals.std(correction=0).item()
    return out
