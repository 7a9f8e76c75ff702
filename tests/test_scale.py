"""Scale: distributed collection (2 gloo ranks), checkpoint + SIGKILL + resume, streamed corpora.

Processes of a distributed run execute the same batches as one process (rank r runs batch i when
i % world == r), so counts must be identical and float64 sums equal to rounding. Forward passes
are only bit-for-bit reproducible at one thread count, so every run here uses one thread
(torchrun sets OMP_NUM_THREADS=1 itself).
"""
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from steer.cli import main
from steer.engine.collect import collect_stream, refine
from steer.engine.batching import plan_batches
from steer.core.corpus import load_corpus, open_corpus
from steer.engine.distributed import Group
from steer.core.experts import ExpertSet
from steer.core.stream import StreamState
from tiny import tiny_model, tiny_tokenizer

TESTS = Path(__file__).parent
# small enough to be quick, large enough for several windows and batches per rank:
# 90 sentences, 20 calibrate, the other 70 in windows of 32 -> 7 + 7 + 2 = 16 batches of <= 5
# LAPE / DiffMean token sums ride along: merged across ranks and checkpoints like the histograms
STREAM = dict(bins=8, calibration=20, batch_size=5, window=32, progress=False, token_stats=("activation", "residual"))
CLI_STREAM = ["--mode", "stream", "--bins", "8", "--calibration", "20", "--batch-size", "5",
              "--window", "32", "-k", "3"]


def sentences(n_per_label=30, seed=0):
    rng = random.Random(seed)
    alphabets = {"a": "abcdefgh ", "b": "mnopqrst ", "c": "abmnxyz "}
    return [(label, "".join(rng.choice(chars) for _ in range(rng.randint(3, 12))).strip() or "x")
            for label, chars in alphabets.items() for _ in range(n_per_label)]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("scale")
    tiny_model("llama").save_pretrained(d / "ckpt")
    tiny_tokenizer().save_pretrained(d / "ckpt")
    corpus = d / "corpus.tsv"
    corpus.write_text("".join(f"{label}\t{text}\n" for label, text in sentences()))
    return d / "ckpt", corpus


@contextmanager
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def assert_same_state(a: StreamState, b: StreamState, exact_sums: bool = False):
    for key in ("edges", "counts", "n", "nonfinite", "lo", "hi"):
        assert torch.equal(getattr(a, key), getattr(b, key)), key
    if exact_sums:
        assert torch.equal(a.sums, b.sums)
    else:  # float64 sums added in another order
        torch.testing.assert_close(a.sums, b.sums, rtol=1e-12, atol=1e-12)
    assert a.label_names == b.label_names
    assert (a.token_stats is None) == (b.token_stats is None)
    if a.token_stats is not None:
        for key, t in a.token_stats.tensors().items():
            other = b.token_stats.tensors()[key]
            if t.dtype == torch.int64 or exact_sums:
                assert torch.equal(t, other), key
            else:
                torch.testing.assert_close(t, other, rtol=1e-12, atol=1e-9)


# --- two gloo processes ------------------------------------------------------------------------

def _rank(rank, world, store, corpus_path, out):
    """One rank: a run that dies mid-way (after the checkpoint at 6 batches), resumed by the same
    two ranks, then refine. Rank 0 keeps a copy of the mid-run checkpoint."""
    import shutil

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        model, tok = tiny_model("llama"), tiny_tokenizer()
        corpus = open_corpus(corpus_path)
        ckpt = Path(out) / "checkpoint.safetensors"
        calls = []

        def crash(*_):  # rank 0 also runs the 4 calibration batches; both die at their 5th own batch
            calls.append(1)
            if len(calls) > (8 if rank == 0 else 4):
                raise KeyboardInterrupt

        handle = model.model.layers[0].register_forward_pre_hook(crash)
        try:
            collect_stream(model, tok, corpus, checkpoint=ckpt, checkpoint_every=3, **STREAM)
        except KeyboardInterrupt:
            pass
        handle.remove()
        dist.barrier()
        if rank == 0:
            shutil.copy(ckpt, Path(out) / "mid.safetensors")
        dist.barrier()
        state = collect_stream(model, tok, corpus, checkpoint=ckpt, checkpoint_every=3, resume=True, **STREAM)
        scores = refine(model, tok, corpus, state if rank == 0 else None, k=4, by=("ap", "auroc"),
                        batch_size=5, progress=False)
        assert (scores is None) == (rank != 0)
        state.save(Path(out) / f"state{rank}.safetensors")  # every rank holds the merged state
        if rank == 0:
            save_file({k: v.contiguous() for k, v in scores.stats.items()}, str(Path(out) / "scores.safetensors"))
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_equal_one_process(files, tmp_path):
    """2 ranks (killed mid-way and resumed, checkpointing on the way) == 1 process; and the
    2-rank mid-run checkpoint resumes in 1 process to the same state."""
    _, corpus_path = files
    mp.spawn(_rank, args=(2, str(tmp_path / "store"), str(corpus_path), str(tmp_path)), nprocs=2)
    model, tok, corpus = tiny_model("llama"), tiny_tokenizer(), open_corpus(corpus_path)
    assert StreamState.load(tmp_path / "mid.safetensors", with_extra=True)[1]["position"] == 6
    with one_thread():
        one = collect_stream(model, tok, corpus, **STREAM)
        exact = refine(model, tok, corpus, one, k=4, by=("ap", "auroc"), batch_size=5, progress=False)
        resumed = collect_stream(model, tok, corpus, checkpoint=tmp_path / "mid.safetensors", resume=True, **STREAM)
    assert_same_state(resumed, one)
    for rank in (0, 1):
        two = StreamState.load(tmp_path / f"state{rank}.safetensors")
        assert_same_state(two, one)
        assert two.settings["tokens"] == one.settings["tokens"]
    assert int(one.n.sum()) == 90
    stats = load_file(str(tmp_path / "scores.safetensors"))
    for key in ("ap", "auroc", "on_p50", "on_mean"):  # the gathered short-list scores exactly alike
        assert torch.equal(stats[key].isnan(), exact.stats[key].isnan()), key
        torch.testing.assert_close(stats[key], exact.stats[key], rtol=1e-12, atol=1e-12, equal_nan=True)


def test_torchrun_cli_equals_one_process(files, tmp_path):
    ckpt, corpus = files
    common = ["find-experts", "--model", str(ckpt), "--corpus", str(corpus), *CLI_STREAM]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "-m", "steer.cli", *common, "--out", str(tmp_path / "two")],
                         env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "on 2 ranks" in run.stdout and run.stdout.count("refine: short-list") == 1  # rank 0 speaks
    with one_thread():
        main(common + ["--out", str(tmp_path / "one")])
    one = StreamState.load(tmp_path / "one" / "state.safetensors")
    two = StreamState.load(tmp_path / "two" / "state.safetensors")
    assert_same_state(two, one)
    a, b = ExpertSet.load(tmp_path / "one" / "experts"), ExpertSet.load(tmp_path / "two" / "experts")
    for c in a.concepts:
        assert a.rows(c) == b.rows(c)
    assert json.loads((tmp_path / "two" / "run.json").read_text())["world_size"] == 2


# --- checkpoint, SIGKILL, resume ---------------------------------------------------------------

# The child is killed at a known point, with no timing: once steer has logged the checkpoint at 6
# batches, it counts batch 7 (work no checkpoint holds), then at the start of batch 8 says WAITING and
# blocks on its stdin; the parent SIGKILLs it there. Should the parent go away instead, stdin closes
# and the child exits 3 without counting on.
KILLED = textwrap.dedent("""
    import logging, os, sys
    import torch
    logging.basicConfig(stream=sys.stdout, level=logging.INFO, format="%(message)s")  # steer logs checkpoints
    sys.path.insert(0, {tests!r})
    from tiny import tiny_model, tiny_tokenizer
    from steer.engine.collect import collect_stream
    from steer.core.corpus import open_corpus
    torch.set_num_threads(1)
    after = []  # forward calls since the checkpoint at 6 batches

    class AtSix(logging.Handler):
        def emit(self, record):
            if record.getMessage().startswith("checkpoint: 6 batches done") and not after:
                after.append(0)

    def hold(*_):
        if after:
            after[0] += 1
            if after[0] == 2:  # batch 7 counted, batch 8 starting
                print("WAITING", flush=True)
                sys.stdin.read()  # until SIGKILL (or EOF: the parent is gone)
                os._exit(3)

    logging.getLogger().addHandler(AtSix())
    model = tiny_model("llama")
    model.model.layers[0].register_forward_pre_hook(hold)
    collect_stream(model, tiny_tokenizer(), open_corpus({corpus!r}), checkpoint={ckpt!r},
                   checkpoint_every=3, **{stream!r})
    print("finished", flush=True)
""")


def test_sigkill_mid_run_then_resume_equals_uninterrupted(files, tmp_path):
    _, corpus_path = files
    ckpt = tmp_path / "checkpoint.safetensors"
    script = KILLED.format(tests=str(TESTS), corpus=str(corpus_path), ckpt=str(ckpt), stream=STREAM)
    proc = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    seen = []
    try:
        for line in proc.stdout:
            seen.append(line)
            if line.strip() == "WAITING":  # blocked in batch 8, batch 7 counted since the checkpoint at 6
                os.kill(proc.pid, signal.SIGKILL)
                break
    finally:
        proc.stdin.close()  # a child not killed above sees EOF and exits 3
        proc.wait(timeout=120)
        proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, seen)
    assert any(line.startswith("checkpoint: 6 batches done") for line in seen), seen
    _, extra = StreamState.load(ckpt, with_extra=True)
    assert extra["position"] == 6  # of 16 batches: batch 7 was counted and lost with the process

    model, tok, corpus = tiny_model("llama"), tiny_tokenizer(), open_corpus(corpus_path)
    with one_thread():
        resumed = collect_stream(model, tok, corpus, checkpoint=ckpt, checkpoint_every=3, resume=True, **STREAM)
        whole = collect_stream(model, tok, corpus, **STREAM)
    assert_same_state(resumed, whole, exact_sums=True)
    assert resumed.settings["tokens"] == whole.settings["tokens"]
    _, extra = StreamState.load(ckpt, with_extra=True)
    assert extra["position"] == 16  # the final checkpoint covers the whole pass


def test_cli_resume_after_a_crash_and_refusals(files, tmp_path):
    """A run that dies after a checkpoint resumes through the CLI to the uninterrupted outputs; a
    checkpoint of another model, corpus or setting is refused naming the difference."""
    from steer.engine.models import load_model

    ckpt_dir, corpus_path = files
    common = ["find-experts", "--model", str(ckpt_dir), "--corpus", str(corpus_path), *CLI_STREAM]
    with one_thread():
        main(common + ["--out", str(tmp_path / "whole")])
        out = tmp_path / "crashed"
        out.mkdir()
        model, tok = load_model(str(ckpt_dir))
        calls = []

        def crash(*_):
            calls.append(1)
            if len(calls) > 8:  # calibration (4 batches) + 4 more: dies after the checkpoint at 2
                raise KeyboardInterrupt

        handle = model.model.layers[0].register_forward_pre_hook(crash)
        with pytest.raises(KeyboardInterrupt):
            collect_stream(model, tok, open_corpus(corpus_path), checkpoint=out / "checkpoint.safetensors",
                           checkpoint_every=2, bins=8, calibration=20, batch_size=5, window=32, progress=False)
        handle.remove()
        assert StreamState.load(out / "checkpoint.safetensors", with_extra=True)[1]["position"] == 4
        with pytest.raises(FileExistsError, match="pass --resume"):  # --debug: the exception, not exit 2
            main(common + ["--checkpoint-every", "2", "--out", str(out), "--debug"])
        with pytest.raises(ValueError, match=r"other settings: bins: 8 in the checkpoint, 16 now"):
            main([*common, "--bins", "16", "--resume", "--out", str(out), "--debug"])
        with pytest.raises(ValueError, match=r"other settings: batch_size: 5 in the checkpoint, 6 now"):
            main([*common, "--batch-size", "6", "--resume", "--out", str(out), "--debug"])
        other = tmp_path / "other.tsv"
        other.write_text(corpus_path.read_text() + "a\tone more\n")
        with pytest.raises(ValueError, match="from another corpus"):
            main([*common[:4], str(other), *CLI_STREAM, "--resume", "--out", str(out), "--debug"])
        tiny_model("llama", seed=1).save_pretrained(tmp_path / "m1")
        tiny_tokenizer().save_pretrained(tmp_path / "m1")
        with pytest.raises(ValueError, match="from another model: fingerprint"):
            main([common[0], "--model", str(tmp_path / "m1"), *common[3:], "--resume", "--out", str(out), "--debug"])
        main(common + ["--resume", "--out", str(out)])
    assert not (out / "checkpoint.safetensors").exists()  # complete: the state holds it all
    assert_same_state(StreamState.load(out / "state.safetensors"),
                      StreamState.load(tmp_path / "whole" / "state.safetensors"), exact_sums=True)
    a, b = ExpertSet.load(tmp_path / "whole" / "experts"), ExpertSet.load(out / "experts")
    assert all(a.rows(c) == b.rows(c) for c in a.concepts)


# --- corpora streamed from files ---------------------------------------------------------------

def test_corpus_file_streams_what_load_corpus_holds(tmp_path, files):
    _, corpus_path = files
    streamed, loaded = open_corpus(corpus_path), load_corpus(corpus_path)
    assert len(streamed) == len(loaded) == 90 and streamed.label_names == loaded.label_names
    assert streamed.hash() == loaded.hash() and streamed.n_per_label == loaded.n_per_label
    assert [tuple(r) for r in streamed.records()] == [tuple(r) for r in loaded.records()]
    assert streamed.load().keys == loaded.keys
    # a directory of label files and table shards, read in name order
    d = tmp_path / "shards"
    d.mkdir()
    (d / "a.txt").write_text("one\ntwo\n")
    (d / "b.tsv").write_text("label\ttext\nb\tthree\nc\tfour\n")
    (d / "c.jsonl").write_text('{"label": "a", "text": "five"}\n')
    (d / "notes.md").write_text("ignored\n")
    c = open_corpus(d)
    assert c.label_names == ["a", "b", "c"] and c.n_per_label == {"a": 3, "b": 1, "c": 1}
    assert [r.key for r in c.records()] == ["a/1", "a/2", "b.tsv:b/2", "b.tsv:c/3", "c.jsonl:a/1"]
    assert c.hash() == c.load().hash()
    declared = open_corpus(d, labels=["c", "b", "a", "z"])  # order given; z absent (warned)
    assert declared.label_names == ["c", "b", "a", "z"] and declared.n_per_label["z"] == 0
    with pytest.raises(ValueError, match="label 'a', not among the declared labels"):
        open_corpus(d, labels=["b", "c"])
    (d / "a.txt").write_text("one\nTWO\n")  # edited after opening: the next full pass refuses it
    with pytest.raises(ValueError, match="changed since the corpus was opened .*hash differs"):
        list(c.records())


def test_batch_order_windows_and_skip_without_tokenizing(files):
    _, corpus_path = files
    corpus = open_corpus(corpus_path)
    tok = tiny_tokenizer()
    full = list(plan_batches(corpus.records(), tok, batch_size=5, window=32))
    assert [b.index for b in full] == list(range(len(full))) and len(full) == 7 + 7 + 6
    for b in full:  # each batch lies in one window and is sorted by length within it
        assert len({r // 32 for r in b.rows}) == 1 and [len(t) for t in b.ids] == sorted(map(len, b.ids), reverse=True)
    assert sorted(r for b in full for r in b.rows) == list(range(90))

    calls = []

    class Counting:
        def __init__(self, tok):
            self.tok = tok

        def __call__(self, texts, **kw):
            calls.append(len(texts))
            return self.tok(texts, **kw)

    tail = list(plan_batches(corpus.records(), Counting(tok), batch_size=5, window=32, skip=9))
    assert [b.index for b in tail] == list(range(9, 20)) and [b.rows for b in tail] == [b.rows for b in full[9:]]
    assert calls == [32, 26]  # the first window (batches 0-6) was skipped without tokenizing


def test_too_long_sentences_truncated_or_refused(files):
    _, corpus_path = files
    model, tok = tiny_model("llama"), tiny_tokenizer()
    corpus = open_corpus(corpus_path)
    with pytest.warns(UserWarning, match=r"more than the limit of 6 .*truncated to 6 tokens"):
        state = collect_stream(model, tok, corpus, max_length=6, **STREAM)
    n_long = sum(len(t) + 1 > 6 for _, t in sentences())  # + BOS
    assert state.settings["truncated"] == n_long > 0
    with pytest.raises(ValueError, match=r"has \d+ tokens, more than the limit of 6"):
        collect_stream(model, tok, corpus, max_length=6, too_long="error", **STREAM)
    with pytest.raises(ValueError, match="exceeds the model's context of 2048"):
        collect_stream(model, tok, corpus, max_length=4096, **STREAM)


def test_group_of_one_is_a_no_op():
    g = Group()
    assert not g.active and g.owns(3) and g.broadcast_object(5) == 5
    rows, vals = torch.tensor([2, 0]), torch.tensor([[1.0], [2.0]])
    assert g.gather_rows(rows, vals, 3)[[0, 2]].tolist() == [[2.0], [1.0]]
