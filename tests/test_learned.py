"""FlashMoE learned policy: features and labels by hand, a small training run, the model file, and
its use through the live engine's entry point (book.step) and in `harness simulate` (held-out only)."""

import numpy as np
import pytest
import torch

from harness.cache.book import ExpertCacheBook
from harness.cache.learned import (
    FlashMoEModel,
    LayerNet,
    TrainSettings,
    distance_cap,
    features,
    layer_samples,
)
from harness.cache.policies import flashmoe as flashmoe_kernels
from harness.cache.policies.flashmoe import FlashMoE
from harness.cache.registry import policy_factory
from harness.errors import HarnessError
from harness.trace.schema import TraceMeta, TraceWriter
from harness.trace.simulate import run_simulation
from harness.trace.train import train_flashmoe


def test_features_by_hand():
    x = features(np.array([-1, 3, 5]), np.array([0.0, 2.0, 1.0]), now=5)
    # 1/rec: never used -> 0; last used at 3 -> rec 3; used now -> rec 1. freq / max(freq).
    assert np.allclose(x, [0, 1 / 3, 1, 0, 1, 0.5])


@pytest.mark.parametrize("experts, hidden, bias", [(3, 5, 1.0), (64, 64, 1.0), (64, 64, 400.0)])
def test_the_compiled_network_computes_the_layer_mlp(experts, hidden, bias):
    # LayerNet.predict runs the compiled `mlp` (the policy kernel's) in float32, the precision the network is
    # trained in: torch's float32 network and numpy's float64 matrix products agree to float32 rounding. The
    # sizes cover the remainder loops (2E = 6 inputs, 5 hidden) and the vectorised ones (the FLAME slice's);
    # first-layer biases scaled 400-fold drive hidden units beyond both ends of the clamp of `expf`.
    rng = np.random.default_rng(0)
    shapes = [(hidden, 2 * experts), (hidden,), (hidden, hidden), (hidden,), (experts, hidden), (experts,)]
    net = LayerNet(*(rng.standard_normal(shape) / np.sqrt(shape[-1]) for shape in shapes))
    net.b1 *= bias
    x = features(rng.integers(-1, 9, experts), rng.integers(0, 5, experts).astype(np.float64), 9)
    with np.errstate(over="ignore"):
        h = net.w1 @ x + net.b1
        h = net.w2 @ (h / (1 + np.exp(-h))) + net.b2
        expected = np.abs(net.w3 @ (h / (1 + np.exp(-h))) + net.b3)
    assert np.allclose(net.predict(x), expected, rtol=1e-5, atol=1e-5)
    linears = [torch.nn.Linear(2 * experts, hidden), torch.nn.Linear(hidden, hidden), torch.nn.Linear(hidden, experts)]
    with torch.no_grad():
        for linear, w, b in zip(linears, (net.w1, net.w2, net.w3), (net.b1, net.b2, net.b3), strict=True):
            linear.weight.copy_(torch.from_numpy(w))
            linear.bias.copy_(torch.from_numpy(b))
        torch_net = torch.nn.Sequential(linears[0], torch.nn.SiLU(), linears[1], torch.nn.SiLU(), linears[2])
        trained = torch_net(torch.from_numpy(x)).abs().numpy()
    assert np.allclose(net.predict(x), trained, rtol=1e-5, atol=1e-5)


def test_labels_are_clamped_normalised_next_use_distances():
    xs, ys = layer_samples([(0, np.array([0])), (1, np.array([1])), (2, np.array([0]))], 3, cap=4)
    # step 0: expert 0 next at 2 (d=2 -> 1/3), expert 1 at 1 (d=1 -> 0), expert 2 never (cap -> 1).
    assert np.allclose(ys, [[1 / 3, 0, 1], [0, 1, 1], [1, 1, 1]])
    assert np.allclose(xs[1], [1 / 2, 1, 0, 1, 1, 0])
    assert distance_cap(64) == 48


def write_random_trace(path, seqs=4, rows=60, experts=8, k=2, layers=(0, 1)):
    rng = np.random.default_rng(5)
    p = 1.0 / np.arange(1, experts + 1)
    p /= p.sum()
    writer = TraceWriter(TraceMeta("toy", "toy", 2, list(layers), experts, k, 0, "random test trace"))
    for s in range(seqs):
        for pos in range(rows):
            for layer in layers:
                ex = rng.choice(experts, k, replace=False, p=p).tolist()
                writer.add(s, pos, s * rows + pos, "decode", layer, ex, None)
    return writer.write(path)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    folder = tmp_path_factory.mktemp("learned")
    trace = write_random_trace(folder / "t.parquet")
    settings = TrainSettings(max_epochs=3, seed=1)
    report = train_flashmoe(trace, folder / "m.pt", capacities="2,4", seed=1, settings=settings)
    return trace, folder / "m.pt", report


def test_training_splits_by_sequence_and_reports_heldout_beside_baselines(trained):
    _, model_path, report = trained
    assert (report.train_sequences, report.heldout_sequences) == ([0, 1, 2], [3])
    assert [(r["policy"], r["capacity_slots"]) for r in report.rows] == [
        (p, c) for c in (2, 4) for p in ("flashmoe", "lru", "lfu", "belady")
    ]
    for c in (2, 4):
        rows = {r["policy"]: r for r in report.rows if r["capacity_slots"] == c}
        assert all(r["hits"] + r["misses"] == rows["belady"]["hits"] + rows["belady"]["misses"] for r in rows.values())
        assert all(r["hits"] <= rows["belady"]["hits"] for r in rows.values())
    model = FlashMoEModel.load(model_path)
    assert model.meta["heldout_sequences"] == [3] and model.meta["distance_cap"] == 6 and model.num_experts == 8
    # Saved as float32, loaded as float64: the same network up to float32 rounding.
    x = features(np.array([0, -1, 3, 1, -1, -1, 2, 0]), np.arange(8.0), 4)
    assert np.allclose(model.nets[0].predict(x), report.model.nets[0].predict(x), atol=1e-5)


def test_flashmoe_runs_through_the_live_entry_point_deterministically(trained):
    _, model_path, _ = trained
    steps = [[0, 1], [2, 3], [0, 4], [5, 1], [0, 2], [6, 7], [1, 3]]

    def run():
        book = ExpertCacheBook([0, 1], 3, "per-layer", policy_factory(f"flashmoe:{model_path}"))
        return [book.step(layer, ex, now).evicted for now, ex in enumerate(steps) for layer in (0, 1)], book

    first, book = run()
    assert first == run()[0] and book.total().accesses == 28
    assert not book.policies[0].needs_future


def test_the_policy_predicts_what_the_network_predicts_on_the_features(trained):
    # The kernel keeps W1's frequency half times the counts up to date a use at a time and divides by the largest
    # count at a prediction; LayerNet.predict computes the network on the features themselves. Same predictions.
    _, model_path, _ = trained
    model = FlashMoEModel.load(model_path)
    policy = FlashMoE(2, 0, model)
    rng = np.random.default_rng(3)
    last, freq = np.full((2, 8), -1), np.zeros((2, 8))
    for now in range(40):
        for layer in (0, 1):
            for expert in rng.choice(8, 2, replace=False):
                policy.on_access((layer, int(expert)), now, True)
                last[layer, expert], freq[layer, expert] = now, freq[layer, expert] + 1
        if now % 13 == 0 or now == 39:
            for layer in (0, 1):
                flashmoe_kernels._predict(policy.g, policy.gf, policy.ki, policy.kf, layer, now)
                start = policy.g[flashmoe_kernels.PREDICTIONS] + 8 * layer
                kernel = policy.gf.view(np.float32)[start : start + 8]
                expected = model.nets[layer].predict(features(last[layer], freq[layer], now))
                assert np.allclose(kernel, expected, rtol=1e-5, atol=1e-6)
    assert freq.max() > 1  # the largest count moved: the division is exercised


def test_flashmoe_refuses_a_layer_or_expert_it_has_no_network_for(trained):
    _, model_path, _ = trained
    book = ExpertCacheBook([7], 2, "per-layer", policy_factory(f"flashmoe:{model_path}"))
    with pytest.raises(HarnessError, match="no network for layer 7"):
        book.step(7, [0], 0)
    book = ExpertCacheBook([0], 2, "per-layer", policy_factory(f"flashmoe:{model_path}"))
    with pytest.raises(HarnessError, match="expert 9 is outside"):
        book.step(0, [9], 0)


def test_simulate_replays_only_heldout_sequences_for_a_model_of_this_trace(trained):
    trace, model_path, report = trained
    run = run_simulation(trace, ["lru", f"flashmoe:{model_path}"], "2,4")
    assert run.heldout_only and run.seq_ids == [3]
    assert any("held-out sequences only ([3])" in note for note in run.notes)
    flash = {r.capacity_slots: r.total().hits for r in run.results if r.policy.startswith("flashmoe")}
    # The same replay as training's evaluation (one held-out sequence: reset modes coincide).
    assert flash == {r["capacity_slots"]: r["hits"] for r in report.rows if r["policy"] == "flashmoe"}


def test_a_file_that_is_not_a_model_is_refused(tmp_path):
    torch.save({"something": 1}, tmp_path / "x.pt")
    with pytest.raises(HarnessError, match="not a FlashMoE model file"):
        FlashMoEModel.load(tmp_path / "x.pt")


def test_a_single_stream_trains_on_its_first_steps_and_is_scored_on_the_rest(tmp_path):
    trace = write_random_trace(tmp_path / "t.parquet", seqs=1, rows=80)
    with pytest.raises(HarnessError, match="leaves nothing held out"):
        train_flashmoe(trace, tmp_path / "m.pt", split="seq:1", settings=TrainSettings(max_epochs=1))
    # Default on one stream: the last quarter of its token steps (20 of 80) is held out.
    report = train_flashmoe(trace, tmp_path / "m.pt", capacities="2", settings=TrainSettings(max_epochs=1))
    assert report.split == "frac:0.75" and report.train_sequences == report.heldout_sequences == [0]
    assert {r["hits"] + r["misses"] for r in report.rows} == {
        run_simulation(trace, ["lru"], "2", phase="decode", split="frac:0.75").results[0].total().accesses
    }
    spec = f"flashmoe:{tmp_path / 'm.pt'}"
    with pytest.raises(HarnessError, match=r"replay with --split frac:0\.75"):
        run_simulation(trace, [spec], "2")
    run = run_simulation(trace, [spec], "2", split="frac:0.75")
    assert run.heldout_only and run.split == "frac:0.75"
