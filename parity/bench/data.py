"""Chunker and masker cases, in this process: minillm.chunk vs run_clm's group_texts through datasets.map,
minillm.sft.mask_batch vs the course's SFT loop (both references in parity/course.py)."""

from __future__ import annotations

import numpy as np

from parity.bench.measure import alternate


def _synthetic_docs(n_tokens: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Flat token ids and document offsets: lengths 1..600 (mean ~300), ids < 32000."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 600, size=n_tokens // 300 + 1)
    lengths = lengths[: np.searchsorted(np.cumsum(lengths), n_tokens) + 1]
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    return rng.integers(0, 32000, size=int(offsets[-1])).astype(np.int32), offsets


def chunker_cases(names: list[str], quick: bool, block_size: int = 1024, map_batch: int = 1000) -> dict[str, dict]:
    import datasets
    import pyarrow as pa

    from minillm.chunk import Chunker, group_texts
    from parity.course import run_clm_group_texts

    datasets.disable_progress_bars()
    n_tokens = 200_000 if quick else 10_000_000
    reps = 1 if quick else 3
    flat, offsets = _synthetic_docs(n_tokens)
    ids = pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat))
    mask = pa.ListArray.from_arrays(pa.array(offsets), pa.array(np.ones_like(flat, dtype=np.int8)))
    ds = datasets.Dataset(pa.table({"input_ids": ids, "attention_mask": mask}))
    n = len(flat)
    kw = dict(batched=True, batch_size=map_batch, load_from_cache_file=False, keep_in_memory=True)
    out = {}
    common = {"tokens": n, "documents": len(ds), "block_size": block_size, "map_batch_size": map_batch, "reps": reps}

    eos = 0
    docs = np.split(flat.astype(np.int64), offsets[1:-1])
    lists = [d.tolist() for d in docs]
    batches = [{"input_ids": lists[i:i + map_batch]} for i in range(0, len(lists), map_batch)]

    def stream():
        return np.concatenate([b["input_ids"] for b in Chunker(block_size, eos_token_id=eos).blocks(batches)])

    fns = {"reference": lambda: ds.map(run_clm_group_texts, fn_kwargs={"block_size": block_size}, **kw)}
    if "chunker" in names:
        # the same mode as run_clm (eos_token_id=None, each map batch's tail dropped): identical blocks expected
        fns["chunker"] = lambda: ds.with_format("arrow").map(group_texts, fn_kwargs={"block_size": block_size}, **kw)
    if "chunker_stream" in names:
        fns["chunker_stream"] = stream
    timed = alternate(fns, reps, warmup=1)  # the first map call also pays datasets' one-off set-up
    t_ref, ref = timed["reference"]
    if "chunker" in names:
        t_ml, got = timed["chunker"]
        same = all(got.data.column(c).equals(ref.data.column(c)) for c in ("input_ids", "attention_mask", "labels"))
        out["chunker"] = dict(common, path="ds.with_format('arrow').map(minillm.chunk.group_texts, batched=True)",
                              reference="ds.map(run_clm group_texts, batched=True)",
                              tokens_s={"minillm": n / t_ml, "reference": n / t_ref}, same_output=bool(same),
                              blocks={"minillm": len(got), "reference": len(ref)})
    if "chunker_stream" in names:
        # the training scripts' path (train/pretrain.py): streaming Chunker with EOS after every document over
        # batches of token-id lists. Its blocks differ from run_clm's by design (EOS, no per-batch tail dropped),
        # so the check is against the stream built by hand: concat(doc + [eos]) cut into blocks.
        t_ml, got = timed["chunker_stream"]
        with_eos = np.insert(flat.astype(np.int64), offsets[1:], eos)
        want = with_eos[: len(with_eos) // block_size * block_size].reshape(-1, block_size)
        out["chunker_stream"] = dict(common, path="Chunker(eos).blocks(batches of token-id lists), as train/pretrain.py",
                                     reference="ds.map(run_clm group_texts, batched=True) (different mode)",
                                     tokens_s={"minillm": n / t_ml, "reference": n / t_ref},
                                     same_output=bool(np.array_equal(got, want)),
                                     check="blocks == concat(doc + [eos]) cut into blocks (run_clm's mode differs)")
    return out


def masker_case(quick: bool, max_len: int = 1024, batch: int = 1000) -> dict:
    from minillm.infra.corpus import SAMPLE_SFT, iter_sft_conversations
    from minillm.sft import DEFAULT_SYSTEM_PROMPT, mask_batch
    from parity.course import course_preprocess, course_preprocess_corrected
    from parity.data import tokenizer

    tok = tokenizer("bundled")
    convs = list(iter_sft_conversations(SAMPLE_SFT))[: 100 if quick else 3000]
    # A leading system turn: the course drops it and renders its default system prompt, minillm renders it
    # (as Qwen's template does). A mode difference, not a bug: both sides get the conversations without it.
    with_system = sum(1 for c in convs if c and c[0]["from"] == "system")
    convs = [c[1:] if c and c[0]["from"] == "system" else c for c in convs]
    reps = 1 if quick else 3

    def minillm():
        out = {"input_ids": [], "labels": []}
        for i in range(0, len(convs), batch):
            b = mask_batch(convs[i:i + batch], tok, max_len, user_role="human")  # the course renders "human"
            out["input_ids"] += b["input_ids"]
            out["labels"] += b["labels"]
        return out

    timed = alternate({"minillm": minillm, "course": lambda: course_preprocess(convs, tok, max_len),
                        "fixed": lambda: course_preprocess_corrected(convs, tok, max_len, DEFAULT_SYSTEM_PROMPT)}, reps)
    (t_ml, got), (t_course, course), (t_fixed, fixed) = timed["minillm"], timed["course"], timed["fixed"]
    # 1. identical ids and labels to the corrected course loop
    same_fixed = got["input_ids"] == fixed["input_ids"] and got["labels"] == fixed["labels"]
    # 2. against the faithful loop: identical ids (then its pad filler), and agreement where both mean the same
    #    thing: every token minillm labels carries the same label there, and every position the course
    #    ignores (its ignore label is pad_token_id) is -100 in minillm. The course also labels <|im_start|>,
    #    <|im_end|> and "\n" of every turn; those positions are counted, not compared.
    pad = tok.pad_token_id
    ids_ok, agree_ok, course_extra = len(got["input_ids"]) == len(convs), True, 0
    for i, (ids, labels) in enumerate(zip(got["input_ids"], got["labels"])):
        c_ids, c_lab = course["input_ids"][i].tolist(), course["labels"][i].tolist()
        n = len(ids)
        ids_ok &= c_ids[:n] == ids and all(x == pad for x in c_ids[n:])
        for m, c in zip(labels, c_lab[:n]):
            if m != -100:
                agree_ok &= m == c
            elif c == pad:
                pass  # both ignore
            else:
                course_extra += 1  # a marker the course trains on
    return {"conversations": len(convs), "system_turns_removed": with_system, "max_len": max_len, "batch": batch, "reps": reps,
            "reference": "course chapter-6 preprocess, faithful (parity/course.py course_preprocess)",
            "conv_s": {"minillm": len(convs) / t_ml, "reference": len(convs) / t_course,
                       "course_corrected": len(convs) / t_fixed},
            "same_as_corrected_course": bool(same_fixed), "ids_same_as_course": bool(ids_ok),
            "labels_agree_with_course_where_defined": bool(agree_ok),
            "course_labelled_markers": course_extra,
            "same_output": bool(same_fixed and ids_ok and agree_ok)}
