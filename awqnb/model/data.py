"""Calibration and evaluation data, offline first.

A data set is found in this order: an explicit path (`data_dir=`), `$AWQNB_DATA_DIR`,
`../shared/data` next to the checkout (or the working directory), then the Hub through
`datasets`. A set found nowhere is an error naming all four; another set is never substituted.
`datasets` does the loading in every case (parquet files locally, the Hub ids otherwise).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import torch

from awqnb.core.errors import AwqnbError

log = logging.getLogger(__name__)

# name → (local file relative to the data dir, Hub (path, config, split))
SOURCES = {
    "wikitext2-test": ("wikitext-2-raw-v1/test.parquet", ("wikitext", "wikitext-2-raw-v1", "test")),
    "wikitext2-validation": ("wikitext-2-raw-v1/validation.parquet", ("wikitext", "wikitext-2-raw-v1", "validation")),
    "ag_news-test": ("ag_news/test.parquet", ("ag_news", None, "test")),
    "c4-validation": ("c4/en-validation-00000-head1025.parquet", None),
    "c4-sample": ("c4/en-validation-sample2k.parquet", None),
}
CALIB_SETS = ("wikitext2", "wikitext2-simple", "c4")
EVAL_TOKEN_SETS = ("wikitext2", "c4")
EVAL_TEXT_SETS = ("ag_news", "c4-sample", "wikitext2")


def data_dirs(data_dir: str | Path | None = None) -> list[Path]:
    """Candidate local data directories, in resolution order."""
    out = []
    if data_dir:
        out.append(Path(data_dir))
    if os.environ.get("AWQNB_DATA_DIR"):
        out.append(Path(os.environ["AWQNB_DATA_DIR"]))
    repo = Path(__file__).resolve().parents[2]
    out += [repo.parent / "shared" / "data", Path.cwd().parent / "shared" / "data"]
    seen, uniq = set(), []
    for d in out:
        if d.resolve() not in seen:
            seen.add(d.resolve())
            uniq.append(d)
    return uniq


@lru_cache(maxsize=16)
def _load_rows(name: str, data_dir: str | None) -> tuple[str, object]:
    """(where it came from, rows with a "text" column) for a named source."""
    try:
        import datasets
    except ImportError:  # a machine with pandas/pyarrow only (the GPU box): local files still load
        datasets = None

    rel, hub = SOURCES[name]
    tried = []
    for d in data_dirs(data_dir):
        f = d / rel
        tried.append(str(f))
        if f.is_file():
            if datasets is None:
                import pandas as pd

                return str(f), {"text": pd.read_parquet(f, columns=["text"])["text"].tolist()}
            ds = datasets.load_dataset("parquet", data_files={"data": str(f)}, split="data")
            return str(f), ds
    if hub is not None and datasets is not None:
        path, cfg, split = hub
        tried.append(f"Hub {path}/{cfg or ''}:{split}")
        try:
            return f"hub:{path}/{cfg}:{split}", datasets.load_dataset(path, cfg, split=split)
        except Exception as e:  # offline or missing: reported below with every place tried
            log.debug("hub load of %s failed: %s", path, e)
    raise AwqnbError(
        f"data set {name!r} was not found. Looked in: the explicit path (data_dir=), $AWQNB_DATA_DIR, "
        f"../shared/data next to the checkout, and the Hugging Face Hub — tried {'; '.join(tried)}. "
        f"Put {rel} under a directory and set AWQNB_DATA_DIR to it."
    )


def _texts(name: str, data_dir=None) -> tuple[str, list[str]]:
    src, ds = _load_rows(name, str(data_dir) if data_dir else None)
    return src, list(ds["text"])


@dataclass
class Calibration:
    """Calibration samples: `samples` are 1-D LongTensors of token ids (equal length for block
    sets, row length for `wikitext2-simple`)."""

    dataset: str
    n_calib: int
    seqlen: int
    seed: int
    source: str
    samples: list[torch.Tensor] = field(repr=False)

    def to_dict(self) -> dict:
        return {"dataset": self.dataset, "n_calib": len(self.samples), "seqlen": self.seqlen,
                "seed": self.seed, "source": self.source,
                "n_tokens": int(sum(s.numel() for s in self.samples))}


def calibration_samples(calibration, who: str) -> list[torch.Tensor]:
    """The samples of a `Calibration`, a list of 1-D token-id tensors or a `[n, T]` tensor, as a
    list; AwqnbError naming `who` when there are none."""
    if isinstance(calibration, torch.Tensor):
        samples = list(calibration.reshape(-1, calibration.shape[-1]))
    else:
        samples = list(getattr(calibration, "samples", calibration) or [])
    if not samples:
        raise AwqnbError(f"{who} need calibration samples; pass awqnb.model.data.load_calibration(...).")
    return samples


def _encode(tokenizer, text: str) -> torch.Tensor:
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0]
    return ids.to(torch.long)


def _blocks(ids: torch.Tensor, n: int, seqlen: int, seed: int, what: str) -> list[torch.Tensor]:
    """n of the non-overlapping `seqlen` blocks of a token stream, chosen with `seed`."""
    n_avail = ids.numel() // seqlen
    if n_avail < n:
        raise AwqnbError(
            f"{what} has {ids.numel()} tokens: {n_avail} blocks of {seqlen}, fewer than n_calib={n}; "
            "lower --n-calib or --calib-seqlen, or use a larger calibration set."
        )
    g = torch.Generator().manual_seed(seed)
    pick = torch.randperm(n_avail, generator=g)[:n].sort().values
    return [ids[i * seqlen:(i + 1) * seqlen].clone() for i in pick.tolist()]


def load_calibration(tokenizer, dataset: str = "wikitext2", n_calib: int = 128, seqlen: int = 512,
                     seed: int = 42, data_dir=None) -> Calibration:
    """Calibration set.

    wikitext2: validation rows joined with "\\n\\n", tokenised, cut into non-overlapping blocks of
    `seqlen`; `n_calib` blocks drawn with `seed`. wikitext2-simple: non-empty validation rows as
    they are (truncated to `seqlen`, rows under 8 tokens dropped), `n_calib` drawn with `seed`.
    c4: GPTQ-style, a random `seqlen` window from each of `n_calib` random documents (of the
    1,025 local validation documents) that are long enough. A path to a .txt file: its text cut
    into blocks like wikitext2.
    """
    if n_calib < 1 or seqlen < 2:
        raise AwqnbError(f"n_calib={n_calib} and seqlen={seqlen} must be at least 1 and 2.")
    if dataset == "wikitext2":
        src, rows = _texts("wikitext2-validation", data_dir)
        samples = _blocks(_encode(tokenizer, "\n\n".join(rows)), n_calib, seqlen, seed, "WikiText-2 validation")
    elif dataset == "wikitext2-simple":
        src, rows = _texts("wikitext2-validation", data_dir)
        rows = [r for r in rows if r.strip()]
        g = torch.Generator().manual_seed(seed)
        samples = []
        for i in torch.randperm(len(rows), generator=g).tolist():
            ids = _encode(tokenizer, rows[i])[:seqlen]
            if ids.numel() >= 8:
                samples.append(ids)
            if len(samples) == n_calib:
                break
        if len(samples) < n_calib:
            raise AwqnbError(f"wikitext2-simple has only {len(samples)} usable rows; lower --n-calib.")
    elif dataset == "c4":
        src, rows = _texts("c4-validation", data_dir)
        g = torch.Generator().manual_seed(seed)
        samples = []
        for i in torch.randperm(len(rows), generator=g).tolist():
            ids = _encode(tokenizer, rows[i])
            if ids.numel() <= seqlen:
                continue
            start = int(torch.randint(0, ids.numel() - seqlen, (1,), generator=g))
            samples.append(ids[start:start + seqlen].clone())
            if len(samples) == n_calib:
                break
        if len(samples) < n_calib:
            raise AwqnbError(f"only {len(samples)} C4 documents are longer than {seqlen} tokens; lower --n-calib.")
    else:
        p = Path(dataset).expanduser()
        if not p.is_file():
            raise AwqnbError(f"calibration set {dataset!r} is unknown: use one of {', '.join(CALIB_SETS)} "
                             "or a path to a UTF-8 text file.")
        text = p.read_text(encoding="utf-8")
        if not text.strip():
            raise AwqnbError(f"calibration file {p} is empty; give a text file with at least n_calib × seqlen tokens.")
        src = str(p)
        samples = _blocks(_encode(tokenizer, text), n_calib, seqlen, seed, str(p))
    return Calibration(dataset, n_calib, seqlen, seed, src, samples)


TEXT_FILE_SUFFIXES = (".txt", ".jsonl", ".parquet")


def is_text_file(dataset) -> bool:
    """Whether `dataset` names the user's own evaluation file (.txt, .jsonl or .parquet)."""
    return isinstance(dataset, (str, Path)) and Path(str(dataset)).suffix.lower() in TEXT_FILE_SUFFIXES


@dataclass
class TextFile:
    """The user's own evaluation text. records: the lines of a .txt (empty ones dropped), the
    `text_column` of each .jsonl record or .parquet row; `joined`: the whole .txt as it is, or the
    records joined with "\\n\\n" (the WikiText-2 convention)."""

    path: str
    sha256: str
    format: str
    records: list[str] = field(repr=False)
    joined: str = field(repr=False)

    def info(self) -> dict:
        """What is recorded beside every number measured on it."""
        return {"file": Path(self.path).name, "path": self.path, "sha256": self.sha256, "format": self.format,
                "records": len(self.records)}


def load_text_file(path: str | Path, text_column: str = "text") -> TextFile:
    """Read a .txt / .jsonl / .parquet evaluation file; AwqnbError saying what is wrong with it."""
    import hashlib

    p = Path(path).expanduser()
    fmt = p.suffix.lower().lstrip(".")
    if ("." + fmt) not in TEXT_FILE_SUFFIXES:
        raise AwqnbError(f"{p}: an evaluation file must end in {', '.join(TEXT_FILE_SUFFIXES)}.")
    if not p.is_file():
        raise AwqnbError(f"evaluation file {p} does not exist; check the path.")
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise AwqnbError(f"cannot read {p}: {e.strerror or e}.") from e
    sha = hashlib.sha256(raw).hexdigest()
    if fmt in ("txt", "jsonl"):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise AwqnbError(f"{p} is not UTF-8 text ({e}); save it as UTF-8.") from e
    if fmt == "txt":
        records, joined = [r for r in text.splitlines() if r.strip()], text
    elif fmt == "jsonl":
        import json

        records = []
        for i, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except ValueError as e:
                raise AwqnbError(f"{p} line {i} is not JSON ({e}); a .jsonl file holds one JSON object per line.") from e
            val = rec.get(text_column) if isinstance(rec, dict) else rec
            if not isinstance(val, str):
                raise AwqnbError(f"{p} line {i} has no string {text_column!r} field; give each record one "
                                 "(or choose the column with --text-column).")
            records.append(val)
        joined = "\n\n".join(records)
    else:
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(p)
        except Exception as e:  # noqa: BLE001  pyarrow's errors for a damaged file vary
            raise AwqnbError(f"{p} is not a readable parquet file ({type(e).__name__}: {e}).") from e
        if text_column not in table.column_names:
            raise AwqnbError(f"{p} has no column {text_column!r} (columns: {', '.join(table.column_names)}); "
                             "choose one with --text-column.")
        records = [r for r in table.column(text_column).to_pylist() if isinstance(r, str)]
        joined = "\n\n".join(records)
    records = [r for r in records if r.strip()]
    if not records:
        raise AwqnbError(f"{p} holds no text to evaluate; give a file with at least one non-empty line or record.")
    return TextFile(str(p), sha, fmt, records, joined)


def dataset_info(dataset, text_column: str = "text") -> dict:
    """For the user's own file: its name, path, sha256, format and record count (recorded beside
    the numbers); {} for a named set."""
    return load_text_file(dataset, text_column).info() if is_text_file(dataset) else {}


def load_eval_tokens(tokenizer, dataset: str = "wikitext2", data_dir=None, text_column: str = "text") -> torch.Tensor:
    """The token stream of a token-perplexity set (GPTQ protocol), `[n_tok]`.

    wikitext2: test rows joined with "\\n\\n", tokenised once (SmolLM2: 304,986 tokens).
    c4: the 1,025 local validation documents joined with " " (GPTQ joins the first 1,100 and
    keeps 256 windows; ours draws from 1,025). A .txt / .jsonl / .parquet path: the user's own
    text (`TextFile.joined`).
    """
    if is_text_file(dataset):
        return _encode(tokenizer, load_text_file(dataset, text_column).joined)
    if dataset == "wikitext2":
        _, rows = _texts("wikitext2-test", data_dir)
        return _encode(tokenizer, "\n\n".join(rows))
    if dataset == "c4":
        _, rows = _texts("c4-validation", data_dir)
        return _encode(tokenizer, " ".join(rows))
    if dataset == "wikitext2-validation":
        _, rows = _texts("wikitext2-validation", data_dir)
        return _encode(tokenizer, "\n\n".join(rows))
    if dataset == "c4-heldout":
        return _encode(tokenizer, " ".join(c4_heldout_rows(data_dir)))
    raise AwqnbError(f"token-perplexity set {dataset!r} is unknown; use one of "
                     f"{', '.join(EVAL_TOKEN_SETS + RANKING_TOKEN_SETS)} "
                     f"or a path to your own {'/'.join(TEXT_FILE_SUFFIXES)} file.")


# --- a slice to rank on, disjoint from the evaluation ---------------------------------------

# token sets for ranking (sensitivity), beside EVAL_TOKEN_SETS; `load_eval_tokens` loads them too
RANKING_TOKEN_SETS = ("wikitext2-validation", "c4-heldout")
# what each token set is, in words (the report's descriptions)
TOKEN_SET_LABELS = {
    "wikitext2": "WikiText-2 test",
    "wikitext2-validation": "WikiText-2 validation",
    "c4": "C4 validation, the first 1,025 documents of shard 00000",
    "c4-heldout": "C4 validation sample less the documents of the c4 evaluation",
}
# calibration set → the token set its text comes from
CALIB_SOURCES = {"wikitext2": "wikitext2-validation", "wikitext2-simple": "wikitext2-validation", "c4": "c4"}


def c4_heldout_rows(data_dir=None) -> list[str]:
    """The documents of the 2,000-document C4 validation sample (`c4-sample`) that are not among the
    1,025 of the c4 evaluation (`c4-validation`), compared by exact text (the sample holds 57 of
    them); in the sample's order."""
    _, evaluation = _texts("c4-validation", data_dir)
    _, sample = _texts("c4-sample", data_dir)
    seen = set(evaluation)
    return [t for t in sample if t not in seen]


def _same_set(a, b) -> bool:
    if is_text_file(a) and is_text_file(b):
        return Path(str(a)).expanduser().resolve() == Path(str(b)).expanduser().resolve()
    return str(a) == str(b)


def token_set_label(dataset, data_dir=None) -> str:
    """A token set in words: 'WikiText-2 test', 'C4 validation sample less … (1,943 of its 2,000
    documents)', 'your file notes.txt'."""
    if is_text_file(dataset):
        return f"your file {Path(str(dataset)).name}"
    if dataset == "c4-heldout":
        n = len(c4_heldout_rows(data_dir))
        _, sample = _texts("c4-sample", data_dir)
        return f"{TOKEN_SET_LABELS[dataset]} ({n:,} of its {len(sample):,} documents, exact text)"
    return TOKEN_SET_LABELS.get(str(dataset), str(dataset))


def slice_description(dataset, n_windows: int | None = None, seqlen: int | None = None, data_dir=None) -> str:
    """'WikiText-2 test, first 8 × 512 tokens' (the windows part left out when not given)."""
    out = token_set_label(dataset, data_dir)
    return out + (f", first {n_windows} × {seqlen} tokens" if n_windows and seqlen else "")


def ranking_dataset(eval_dataset, rank_dataset="auto", allow_eval: bool = False) -> str:
    """The token set to rank on (sensitivity) when `eval_dataset` scores: with rank_dataset 'auto',
    wikitext2 → wikitext2-validation, c4 → c4-heldout, the user's own file → wikitext2-validation
    (each disjoint from the evaluation by construction); otherwise `rank_dataset` itself, refused
    when it is the evaluation set unless `allow_eval`."""
    if rank_dataset in (None, "", "auto"):
        return "c4-heldout" if eval_dataset == "c4" else "wikitext2-validation"
    if _same_set(rank_dataset, eval_dataset) and not allow_eval:
        raise AwqnbError(f"the ranking set {rank_dataset!r} is the evaluation set: plans would be scored on the "
                         "data they were chosen on; use 'auto' (a disjoint slice) or allow it explicitly.")
    if not is_text_file(rank_dataset) and rank_dataset not in EVAL_TOKEN_SETS + RANKING_TOKEN_SETS:
        raise AwqnbError(f"ranking set {rank_dataset!r} is unknown; use 'auto', one of "
                         f"{', '.join(EVAL_TOKEN_SETS + RANKING_TOKEN_SETS)} or a path to a "
                         f"{'/'.join(TEXT_FILE_SUFFIXES)} file.")
    return str(rank_dataset)


def ranking_tokens(tokenizer, eval_dataset, data_dir=None, *, rank_dataset="auto", allow_eval: bool = False,
                   n_windows: int | None = None, seqlen: int | None = None, calib_dataset=None,
                   text_column: str = "text") -> tuple[torch.Tensor, str]:
    """(tokens `[n_tok]`, description) of the slice to rank on: `ranking_dataset`'s choice, loaded
    with `load_eval_tokens`. The description says which slice ranks, which scores, whether they are
    disjoint, and, with `calib_dataset`, whether calibration is drawn from the ranking set, e.g.
    'WikiText-2 validation, first 8 × 512 tokens; evaluation: WikiText-2 test (disjoint); calibration
    is also drawn from WikiText-2 validation (the ranking slice may share tokens with calibration,
    not with the evaluation)'."""
    name = ranking_dataset(eval_dataset, rank_dataset, allow_eval)
    tokens = load_eval_tokens(tokenizer, name, data_dir, text_column)
    desc = slice_description(name, n_windows, seqlen, data_dir)
    if _same_set(name, eval_dataset):
        desc += "; evaluation: the same set — the plans are scored on the data they were chosen on"
    else:
        own = " (another source: disjoint unless the file holds that text)" if is_text_file(eval_dataset) else \
            " (disjoint)"
        desc += f"; evaluation: {token_set_label(eval_dataset, data_dir)}{own}"
    calib_src = CALIB_SOURCES.get(str(calib_dataset)) if calib_dataset is not None and not is_text_file(
        calib_dataset) else None
    if calib_dataset is not None and (calib_src == name or _same_set(calib_dataset, name)):
        desc += (f"; calibration is also drawn from {token_set_label(name, data_dir)} (the ranking slice may "
                 "share tokens with calibration, not with the evaluation)")
    return tokens, desc


def load_eval_texts(dataset: str = "ag_news", n_samples: int = 2000, seed: int = 42, data_dir=None,
                    text_column: str = "text") -> list[str]:
    """Texts for sample perplexity: `n_samples` drawn with `seed` (AG News rows cluster by label,
    so the first n would be biased). ag_news: the `text` column (title + description).
    c4-sample: the 2,000-document C4 validation sample. wikitext2: non-empty test rows. A .txt /
    .jsonl / .parquet path: its non-empty lines or records (`TextFile.records`)."""
    if not isinstance(n_samples, int) or isinstance(n_samples, bool) or n_samples < 1:
        raise AwqnbError(f"n_samples={n_samples!r} must be a whole number of at least 1.")
    names = {"ag_news": "ag_news-test", "c4-sample": "c4-sample", "wikitext2": "wikitext2-test"}
    if is_text_file(dataset):
        rows = load_text_file(dataset, text_column).records
    elif dataset not in names:
        raise AwqnbError(f"sample-perplexity set {dataset!r} is unknown; use one of {', '.join(EVAL_TEXT_SETS)} "
                         f"or a path to your own {'/'.join(TEXT_FILE_SUFFIXES)} file.")
    else:
        _, rows = _texts(names[dataset], data_dir)
    rows = [r for r in rows if r.strip()]
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(rows), generator=g)[: min(n_samples, len(rows))].sort().values
    return [rows[i] for i in idx.tolist()]
