"""``taskvec vocab``: θ read out in the model's own vocabulary (the paper's Tables 3 and 7).

θ, averaged over demonstration sets (``--method function_vector``: the task's function vector), goes through
what the model applies after its last block (final norm, unembedding, logit soft-capping), and the top-k
tokens are listed per task and layer.

How: :func:`project` runs a one-token forward pass with the last block's output at that position replaced by
the vector, and reads the logits there. Nothing after the last block mixes positions, so those logits are
exactly the model's own readout of the vector, whatever the architecture does there: GPT-2's LayerNorm,
Llama's RMSNorm, Gemma's (1 + w) norm scaling, tied or untied output embeddings, Gemma 2/3's final logit
soft-capping. No attribute has to be found or re-implemented (a hand-written norm-then-matmul silently drops
whichever of these a model adds); the tests check that projecting a last block's output reproduces the logits.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from lm_eval_taskvec.analyses.common import (
    block_of,
    function_vectors,
    load_tasks,
    num_fewshot_of,
    open_model,
    theta_sets,
    write_json,
    write_table,
)
from lm_eval_taskvec.comparison.cli import chat_options
from lm_eval_taskvec.figures import new_figure, save
from lm_eval_taskvec.identity import model_identity
from lm_eval_taskvec.layers import write_states


def main(args) -> dict:
    """``taskvec vocab``, from its parsed command-line options."""
    lm = open_model(args.model_args, args.batch_size, args.device, getattr(args, "method", None))
    layers = [part.strip() for part in args.layers.split(",") if part.strip()] if args.layers else [args.layer]
    return vocab_projection(
        lm,
        load_tasks(args.tasks, args.include_path, lm, chat_options(args)),
        args.output_path,
        layers=layers,
        top_k=args.top_k,
        num_sets=args.num_sets,
        num_fewshot=args.num_fewshot,
        seed=args.seed,
    )


def project(lm, vectors: torch.Tensor) -> torch.Tensor:
    """The model's logits for each row of ``vectors`` [n, hidden] read as the last block's output: [n, vocab]."""
    tokenizer = lm.tokenizer
    token = next(t for t in (tokenizer.bos_token_id, tokenizer.eos_token_id, 0) if t is not None)
    ids = torch.full((len(vectors), 1), token, dtype=torch.long, device=lm.device)
    with torch.no_grad(), write_states(lm.blocks[-1], vectors, -1) as record:
        logits = lm.model(input_ids=ids).logits
    if record.patched != 1:
        raise RuntimeError(f"the last block ran {record.patched} times in a one-token pass, expected once")
    return logits[:, -1].float().cpu()


def vocab_projection(
    lm,
    tasks: dict,
    output_path,
    layers=("auto",),
    top_k: int = 10,
    num_sets: int = 50,
    num_fewshot: int | None = None,
    seed: int = 1234,
) -> dict:
    """Top-k tokens of the mean θ per task at each of ``layers`` (``auto``, block indices or fractions of
    depth); writes vocab.{md,csv,json,png} into ``output_path`` and returns every number."""
    if top_k < 1:
        raise ValueError(f"--top_k {top_k}: list at least one token")
    rows, entries = [], []
    for name in tqdm(list(tasks), desc="vocab: θ per task"):
        blocks = list(dict.fromkeys(block_of(lm, name, layer) for layer in layers))
        k, heads = num_fewshot_of(tasks[name], num_fewshot), None
        if lm.settings.vector == "function_vector":  # one vector per task, projected as Todd et al. do
            mean, heads = function_vectors(lm, name, tasks[name], blocks, num_fewshot)
        else:
            mean = theta_sets(lm, tasks[name], blocks, num_sets, k, seed).mean(1)
        logits = project(lm, mean)
        probs = logits.softmax(-1)
        for block, row_logits, row_probs in zip(blocks, logits, probs):
            top = row_logits.topk(top_k).indices.tolist()
            pieces = lm.tokenizer.convert_ids_to_tokens(top)
            tokens = [
                {
                    "id": i,
                    "text": lm.tok_decode([i]),
                    "token": piece,
                    "logit": row_logits[i].item(),
                    "prob": row_probs[i].item(),
                }
                for i, piece in zip(top, pieces)
            ]
            entries.append(
                {"task": name, "layer": block, "num_fewshot": k, "tokens": tokens}
                | ({"function_vector": heads} if heads else {})
            )
            rows.append({"task": name, "layer": block, "top_tokens": ", ".join(map(_shown, tokens))})

    out = Path(output_path)
    table = write_table(rows, out / "vocab")
    result = {
        "settings": {
            "model": model_identity(lm.model, len(lm.blocks)),
            "layers": [str(layer) for layer in layers],
            "top_k": top_k,
            "method": lm.settings.method,
            "num_sets": num_sets,
            "num_fewshot": num_fewshot,
            "num_dummy": lm.settings.num_dummy,
            "seed": seed,
        },
        "table": rows,
        "entries": entries,
    }
    write_json(result, out / "vocab.json")
    _plot(entries, out / "vocab.png")
    print(f"{table}wrote vocab.md, .csv, .json and .png to {out}")
    return result


def _shown(token: dict) -> str:
    """A token as a table cell: its text without surrounding spaces; its repr when that would hide it (spaces,
    newlines); the vocabulary entry when it decodes to nothing (special tokens)."""
    text = token["text"]
    if text.strip() and text.strip().isprintable():
        return text.strip()
    return repr(text) if text else token["token"]


def _plot(entries: list[dict], path: Path) -> None:
    """The table as a picture: a row per task and layer, the top tokens in rank order, shaded by probability."""
    probs = np.array([[t["prob"] for t in e["tokens"]] for e in entries])
    fig = new_figure(figsize=(1.1 * probs.shape[1] + 3, 0.38 * len(entries) + 1.2))
    ax = fig.subplots()
    image = ax.imshow(probs, cmap="Blues", aspect="auto", vmin=0, vmax=max(probs.max(), 1e-9))
    for r, entry in enumerate(entries):
        for c, token in enumerate(entry["tokens"]):
            ax.text(
                c,
                r,
                _shown(token)[:12],
                ha="center",
                va="center",
                fontsize=7,
                color="white" if token["prob"] > 0.6 * probs.max() else "black",
            )
    ax.set_yticks(range(len(entries)), [f"{e['task'].removeprefix('tv_')} @{e['layer']}" for e in entries], fontsize=7)
    ax.set_xticks(range(probs.shape[1]), [str(i + 1) for i in range(probs.shape[1])], fontsize=7)
    ax.set_xlabel("rank of the token in the projection of mean θ")
    fig.colorbar(image, ax=ax, label="probability", fraction=0.03)
    fig.tight_layout()
    save(fig, path)
