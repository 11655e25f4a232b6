"""--precision bf16 through the tool (issue #32): training records it and resumes byte for byte,
eval (static and dynamic) and sample read bfloat16 operands, an old checkpoint is f32, and a float64
model is refused in one line. The engine's bf16 products are tested in test_bf16.py; here the
tool's own bf16 paths (evaluate.Scorer, sample.Stream) are checked against the emulation
(tests/bf16_reference.py)."""
import json

import numpy as np
import pytest

from charlstm import evaluate, sample
from charlstm.checkpoint import load_checkpoint, save_checkpoint
from charlstm.cli import cli
from charlstm.config import ModelConfig, TrainConfig
from charlstm.dynamic import Segments
from charlstm.model import param_count, views

from tests import bf16_reference as emul
from tests.conftest import TINY, cli_runner
from tests.test_bad_input import checkpoints, one_line_error
from tests.test_train import arrays, losses

BF16 = ["--precision", "bf16"]
TEXT = "ROMEO:\nIs the day so young?\n\nBENVOLIO:\nBut new struck nine.\n"
VOCAB = "".join(sorted(set(TEXT)))


def invoke(*args):
    return cli_runner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def train(corpus, out, run, *options, steps=20):
    result = invoke("train", corpus, *TINY, *options, "--steps", steps, "--out", out, "--run", run, "--quiet")
    assert result.exit_code == 0, result.output
    return out / run / "latest.npz"


def make_model(layers=2, peepholes=True, hidden=19, seed=0, dtype="float32"):
    config = ModelConfig(VOCAB, hidden=hidden, layers=layers, peepholes=peepholes, dtype=dtype)
    return np.random.default_rng(seed).uniform(-0.5, 0.5, param_count(config)).astype(dtype), config


def emulated(params, config, ids):
    """The emulation's forward (the Widen product) over ids from zero state: (mean nats, h, c)."""
    p = {k: np.array(v, np.float32) for k, v in views(params, config).items()}
    zero = np.zeros((config.layers, 1, config.hidden), np.float32)
    loss, _, h, c = emul.forward(p, ids[None, :-1], ids[None, 1:], zero, zero, config.layers, config.peepholes, "widen")
    return loss, h[:, 0], c[:, 0]


# ---------------------------------------------------------------------------------------- training

@pytest.mark.parametrize("options", [[], ["--dropout", "0", "--batch-size", "1"], ["--weight-drop", "0.3"]])
def test_bf16_resume_is_exact_byte_for_byte(tmp_path, corpus, options):
    straight = train(corpus, tmp_path, "straight", *BF16, *options, steps=40)
    train(corpus, tmp_path, "split", *BF16, *options, steps=20)
    result = invoke("train", "--resume", tmp_path / "split" / "latest.npz", "--steps", 40, "--quiet")
    assert result.exit_code == 0, result.output
    split = tmp_path / "split" / "latest.npz"
    assert arrays(straight) == arrays(split)
    assert losses(tmp_path / "straight") == losses(tmp_path / "split")
    assert load_checkpoint(split).manifest["train"]["precision"] == "bf16"
    assert load_checkpoint(split).train_config.precision == "bf16"


def test_bf16_trains_otherwise_than_f32_and_f32_is_the_default(tmp_path, corpus):
    default = train(corpus, tmp_path, "default")
    f32 = train(corpus, tmp_path, "f32", "--precision", "f32")
    bf16 = train(corpus, tmp_path, "bf16", *BF16)
    assert arrays(default) == arrays(f32)
    assert load_checkpoint(default).train_config.precision == "f32"
    assert arrays(bf16)["params"] != arrays(f32)["params"]
    # the same learning, to within what rounding the products' operands moves it
    assert abs(losses(tmp_path / "bf16")[20, "val_loss"] - losses(tmp_path / "f32")[20, "val_loss"]) < 0.02


def test_a_resumed_run_keeps_its_precision_and_refuses_another(tmp_path, corpus):
    latest = train(corpus, tmp_path, "run", *BF16, steps=10)
    before = checkpoints(tmp_path)
    line = one_line_error(invoke("train", "--resume", latest, "--precision", "f32", "--steps", 20), code=1)
    assert "--precision f32 (checkpoint: bf16)" in line and "drop them" in line
    assert checkpoints(tmp_path) == before
    assert invoke("train", "--resume", latest, "--precision", "bf16", "--steps", 20, "--quiet").exit_code == 0
    assert load_checkpoint(latest).train_config.precision == "bf16"


def test_summary_and_info_name_the_precision(tmp_path, corpus):
    result = invoke("train", corpus, *TINY, *BF16, "--steps", 5, "--out", tmp_path, "--run", "run")
    assert result.exit_code == 0
    assert "float32, precision bf16" in result.stdout
    info = invoke("info", tmp_path / "run" / "latest.npz")
    assert "float32, precision bf16" in info.stdout
    assert json.loads(invoke("info", tmp_path / "run" / "latest.npz", "--json").stdout)["train"]["precision"] == "bf16"


def test_a_manifest_without_precision_is_f32(tmp_path, corpus):
    """Checkpoints written before --precision existed trained in float32."""
    legacy = {k: v for k, v in TrainConfig(precision="bf16").to_dict().items() if k != "precision"}
    assert TrainConfig.from_dict(legacy).precision == "f32"
    latest = train(corpus, tmp_path, "old", steps=10)
    with np.load(latest) as f:
        files = {k: f[k] for k in f.files}
    manifest = json.loads(files["manifest"].tobytes())
    del manifest["train"]["precision"]
    files["manifest"] = np.frombuffer(json.dumps(manifest).encode(), dtype=np.uint8)
    with open(latest, "wb") as f:
        np.savez(f, **files)
    assert load_checkpoint(latest).train_config.precision == "f32"
    assert "precision f32" in invoke("info", latest).stdout
    assert invoke("train", "--resume", latest, "--steps", 12, "--quiet").exit_code == 0
    assert load_checkpoint(latest).manifest["train"]["precision"] == "f32"


@pytest.mark.parametrize("value, words", [("fp8", ["precision 'fp8'"]), ("bf16", ["precision bf16", "float64"])])
def test_a_manifest_with_a_precision_it_cannot_run_is_refused(tmp_path, value, words):
    params, config = make_model(dtype="float64")
    train_cfg = {**TrainConfig().to_dict(), "precision": value}
    state = np.zeros((config.layers, train_cfg["batch_size"], config.hidden))
    with pytest.raises(ValueError) as info:  # save's self-check: what load would refuse
        save_checkpoint(tmp_path / "bad.npz", {"model": config.to_dict(), "train": train_cfg}, params,
                        np.zeros_like(params), state, state)
    for word in words:
        assert word in str(info.value)


# ---------------------------------------------------------------------------------------- refusals

def test_bf16_with_float64_is_one_usage_line(tmp_path, corpus):
    line = one_line_error(invoke("train", corpus, "--dtype", "float64", *BF16, "--out", tmp_path / "out"), code=2)
    assert "--precision bf16 needs --dtype float32" in line and line.endswith("(see 'charlstm train --help')")
    assert not (tmp_path / "out").exists()


def test_bf16_on_a_float64_checkpoint_is_one_line(tmp_path, corpus):
    latest = train(corpus, tmp_path, "f64", "--dtype", "float64", steps=5)
    before = checkpoints(tmp_path)
    for args in (["eval", latest, corpus], ["eval", latest, corpus, "--dynamic"], ["sample", latest],
                 ["sample", latest, "--adapt", corpus], ["train", corpus, "--init-from", latest, "--out", tmp_path]):
        one_line_error(invoke(*args, *BF16), "--precision bf16 needs a float32 model", "float64", code=1)
    assert checkpoints(tmp_path) == before


# ---------------------------------------------------------------------------------------- eval and sample

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny model trained in float32 (the team restored after --threads 1)."""
    from charlstm.engine.threads import team

    folder = tmp_path_factory.mktemp("trained")
    corpus = folder / "corpus.txt"
    corpus.write_text(TEXT * 20, encoding="utf-8")
    most, size = team.most, team.size
    try:
        latest = train(corpus, folder, "run", "--hidden", "32", steps=60)
    finally:
        team.most, team.size = most, size
    return latest, corpus


def scores(*args):
    result = invoke("eval", *args, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_eval_bf16_is_within_0_02_nats_of_f32(trained):
    latest, corpus = trained
    f32, bf16 = scores(latest, corpus), scores(latest, corpus, *BF16)
    assert f32 == scores(latest, corpus, "--precision", "f32")
    assert f32["chars"] == bf16["chars"] and f32["nats_per_char"] != bf16["nats_per_char"]
    assert abs(f32["nats_per_char"] - bf16["nats_per_char"]) < 0.02
    dynamic_f32, dynamic_bf16 = scores(latest, corpus, "--dynamic"), scores(latest, corpus, "--dynamic", *BF16)
    for pass_ in ("static", "dynamic"):
        assert abs(dynamic_f32[pass_]["nats_per_char"] - dynamic_bf16[pass_]["nats_per_char"]) < 0.02
    # the static pass of dynamic evaluation runs the training Workspace: the same numbers to rounding
    assert abs(dynamic_bf16["static"]["nats_per_char"] - bf16["nats_per_char"]) < 1e-4


@pytest.mark.parametrize("adapt", [False, True])
def test_sample_bf16_writes_the_asked_length(trained, adapt):
    latest, corpus = trained
    extra = ["--adapt", corpus] if adapt else []
    result = invoke("sample", latest, "--length", 70, "--seed", 3, *BF16, *extra)
    assert result.exit_code == 0, result.output
    assert len(result.stdout) == 71 and result.stdout.endswith("\n")
    assert result.stdout == invoke("sample", latest, "--length", 70, "--seed", 3, *BF16, *extra).stdout


@pytest.mark.parametrize("team", [(1, 1), (3, 2)])
@pytest.mark.parametrize("layers,peepholes", [(1, False), (2, True), (3, False)])
def test_scorer_bf16_matches_the_emulation_across_windows(layers, peepholes, team, team_of):
    """Only the products' operands rounded; a float32 difference of an ulp in h may round to the
    other bfloat16 neighbour, so the score agrees to 1e-4 nats, not to the last bit."""
    team_of(*team)
    params, config = make_model(layers, peepholes)
    ids = np.array([VOCAB.index(ch) for ch in TEXT * 2])
    expected, _, _ = emulated(params, config, ids)
    f32 = evaluate.Scorer(params, config)
    f32.feed(ids)
    for window in (1024, 7, 1):
        scorer = evaluate.Scorer(params, config, window=window, precision="bf16")
        scorer.feed(ids)
        assert abs(scorer.score() - expected) < 1e-4, window
        assert scorer.score() != f32.score()


def test_dynamic_static_pass_bf16_matches_the_emulation():
    params, config = make_model()
    ids = np.array([VOCAB.index(ch) for ch in TEXT * 2])
    expected, _, _ = emulated(params, config, ids)
    segments = Segments(params, config, 50, precision="bf16")
    segments.feed(ids)
    segments.finish()
    assert abs(segments.score() - expected) < 1e-4


@pytest.mark.parametrize("hidden", [19, 20])  # Dot's pairs need an even H: 19 falls back to Widen
@pytest.mark.parametrize("product", ["dot", "widen"])
@pytest.mark.parametrize("layers,peepholes", [(1, False), (2, True)])
def test_stream_bf16_prime_leaves_the_emulations_state(monkeypatch, layers, peepholes, product, hidden):
    """The stream's h and c stay float32 (the output layer reads h as training's does); the
    products read its operand copy, h rounded to bfloat16 (bits for Dot's pairs, values for Widen)."""
    from charlstm.engine.target import BF16_PRODUCT

    if product == "dot" and BF16_PRODUCT != "dot":
        pytest.skip(f"this CPU's bfloat16 product is {BF16_PRODUCT}: no avx512_bf16 for Dot")
    monkeypatch.setattr(sample, "BF16_PRODUCT", product)
    params, config = make_model(layers, peepholes, hidden=hidden)
    ids = np.array([VOCAB.index(ch) for ch in TEXT])
    _, h, c = emulated(params, config, np.append(ids, 0))
    stream = sample.Stream(params, config, "bf16")
    stream.feed(ids)
    H = config.hidden
    assert (stream.statex.dtype == np.uint16) == (product == "dot" and H % 2 == 0)
    assert np.abs(stream.h - h).max() <= 2 ** -7 * np.abs(h).max()
    assert np.abs(stream.c - c).max() < 1e-3
    operand = stream.statex[0, 0, :, H:]
    as_values = emul.from_bits(operand) if operand.dtype == np.uint16 else operand
    assert np.array_equal(as_values, emul.round_bf16(stream.h))


def test_a_second_bf16_model_compiles_nothing_new():
    """Other shapes, layer counts and peepholes in bf16 reuse the kernels the first compiled."""
    from charlstm.engine import bf16, recurrent, stream_kernels

    def use(layers, peepholes, seed):
        params, config = make_model(layers, peepholes, seed=seed)
        evaluate.Scorer(params, config, window=8, precision="bf16").feed(np.arange(20) % len(VOCAB))
        "".join(sample.generate(sample.Stream(params, config, "bf16"), np.random.default_rng(0), 20))

    use(2, True, 0)
    used = [recurrent.forward_grid, stream_kernels.run_streams, bf16.round_rows, bf16.pack_rows]
    counts = [len(k.signatures) for k in used]
    use(1, False, 1)
    use(3, True, 2)
    assert counts == [len(k.signatures) for k in used]


# ---------------------------------------------------------------------------------------- bench

@pytest.mark.parametrize("precision", ["f32", "bf16"])
def test_bench_says_which_bf16_product_ran(monkeypatch, corpus, precision):
    """Without timing anything: measure is replaced, the output around it is what is tested."""
    from charlstm import bench
    from charlstm.engine.target import BF16_PRODUCT

    monkeypatch.setattr(bench, "measure", lambda *args, **kwargs: {"chars_per_s": 1000.0, "gflops": 1.0})
    shape = ["--hidden", 8, "--batch-size", 2, "--seq-length", 4, "--layers", 1]
    result = json.loads(invoke("bench", corpus, *shape, "--precision", precision, "--json").stdout)
    assert result.get("product") == (BF16_PRODUCT if precision == "bf16" else None)
    table = invoke("bench", corpus, *shape, "--precision", precision).stdout
    assert (f"bf16 product: {BF16_PRODUCT}" in table) == (precision == "bf16")


# ---------------------------------------------------------------------------------------- a fresh cache

# f32 and bf16 runs mixed: the one-stream model (H = 192, B = 1) splits its step across threads.
MIXED_MODELS = {"small": ["--hidden", "16", "--layers", "2", "--batch-size", "4", "--seq-length", "8"],
                "one192": ["--hidden", "192", "--layers", "2", "--batch-size", "1", "--seq-length", "16"]}


def mixed_commands(ck):
    """(name, argv) of train, eval and sample in f32 and bf16, interleaved; ck: the runs' folder."""
    train_ = lambda run, opts, precision: (f"train {run}", ["train", "corpus.txt", *opts, "--precision", precision,
                                                            "--steps", "3", "--eval-every", "2", "--out", ck,
                                                            "--run", run, "--quiet", "--threads", "2"])
    ckpt = lambda run: f"{ck}/{run}/latest.npz"
    return [
        train_("small-f32", MIXED_MODELS["small"], "f32"),
        train_("small-bf16", MIXED_MODELS["small"], "bf16"),
        ("eval bf16 of bf16", ["eval", ckpt("small-bf16"), "corpus.txt", "--json", *BF16]),
        ("eval f32 of bf16", ["eval", ckpt("small-bf16"), "corpus.txt", "--json"]),
        train_("one192-bf16", MIXED_MODELS["one192"], "bf16"),
        ("sample bf16", ["sample", ckpt("one192-bf16"), "--length", "60", "--seed", "1", *BF16]),
        ("sample f32", ["sample", ckpt("one192-bf16"), "--length", "60", "--seed", "1"]),
        train_("one192-f32", MIXED_MODELS["one192"], "f32"),
        ("eval bf16 of f32", ["eval", ckpt("one192-f32"), "corpus.txt", "--json", *BF16]),
        ("eval dynamic bf16", ["eval", ckpt("small-f32"), "corpus.txt", "--json", "--dynamic", *BF16]),
        ("sample adapt bf16", ["sample", ckpt("small-f32"), "--length", "40", "--seed", "2", "--adapt", "corpus.txt",
                               *BF16]),
        ("eval dynamic f32", ["eval", ckpt("small-bf16"), "corpus.txt", "--json", "--dynamic"]),
    ]


@pytest.mark.slow
def test_f32_and_bf16_mixed_on_a_fresh_cache_then_warm(tmp_path):
    """Slow (a fresh cache compiles every kernel of both precisions): no process dies, and the warm
    round prints the scores and text (and trains the arrays) of the cold one."""
    from tests.conftest import SHAKESPEARE_HEAD
    from tests.test_cache_sequences import outcome, run

    (tmp_path / "corpus.txt").write_text(SHAKESPEARE_HEAD * 8, encoding="utf-8")
    cache = tmp_path / "cache"

    def untimed(name, out):  # the scores without `eval --dynamic`'s seconds
        if not name.startswith("eval"):
            return out
        scores = json.loads(out)
        for pass_ in ("static", "dynamic"):
            scores.get(pass_, {}).pop("seconds", None)
        return scores
    rounds = [{name: untimed(name, outcome(name, argv, run(argv, cache, tmp_path), tmp_path))
               for name, argv in mixed_commands(ck)} for ck in ("ck-cold", "ck-warm")]
    assert rounds[0] == rounds[1]
    assert rounds[0]["eval bf16 of bf16"] != rounds[0]["eval f32 of bf16"]
