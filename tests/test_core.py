"""Tests of the statistics, solvers, pruning, calibration, selection and recovery modules on tiny models."""

import re

import pytest
import torch
from conftest import HIDDEN_SIZE, NUM_LAYERS, QWEN2_LAYER_TYPES, QWEN2_MAX_WINDOW_LAYERS
from torch.testing import assert_close

from ghostpl.boundaries import Boundary, boundaries_of, validate_removed_layers
from ghostpl.calibration import collect_boundary_statistics, collect_similarity_statistics
from ghostpl.models import base_model, decoder_layers, final_norm
from ghostpl.operators import ADAPTER_ATTRIBUTE
from ghostpl.pruning import LayerPruner
from ghostpl.recovery import RecoveredModel, calibrate, solve_all
from ghostpl.selection import SimilarityStatistics, select_block_influence, select_contiguous, select_layers
from ghostpl.solvers import Solution, solve_ghost, solve_regularized
from ghostpl.statistics import BoundaryStatistics

F64 = torch.float64


def random_regression(num_rows: int, dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Return float64 ``X_pre`` and ``X_post = X_pre B + noise`` with a random ``B`` near the identity."""
    generator = torch.Generator().manual_seed(seed)
    x_pre = torch.randn(num_rows, dim, generator=generator, dtype=F64)
    mixing = torch.eye(dim, dtype=F64) + 0.3 * torch.randn(dim, dim, generator=generator, dtype=F64)
    noise = 0.1 * torch.randn(num_rows, dim, generator=generator, dtype=F64)
    return x_pre, x_pre @ mixing + noise


def statistics_of(x_pre: torch.Tensor, x_post: torch.Tensor) -> BoundaryStatistics:
    stats = BoundaryStatistics.zeros(x_pre.shape[1])
    stats.add(x_pre, x_post)
    return stats


def direct_residual(x_pre: torch.Tensor, x_post: torch.Tensor, operator: torch.Tensor) -> float:
    """Compute ``‖X_pre W - X_post‖² / ‖X_pre - X_post‖²`` from the rows themselves."""
    return float((x_pre @ operator - x_post).square().sum() / (x_pre - x_post).square().sum())


def operator_of(solution: Solution) -> torch.Tensor:
    """Return the full operator ``W = I + M`` of a solution."""
    return torch.eye(solution.delta.shape[0], dtype=solution.delta.dtype) + solution.delta


def random_linear_map(dim: int, seed: int) -> torch.Tensor:
    """Return a random invertible float32 map ``I + E`` whose ``E`` has spectral norm about 1."""
    generator = torch.Generator().manual_seed(seed)
    return torch.eye(dim) + 0.5 * torch.randn(dim, dim, generator=generator) / dim**0.5


def make_layers_linear(model, maps: dict[int, torch.Tensor]) -> None:
    """Replace the forward of each layer in ``maps`` by ``hidden_states @ matrix``."""
    layers = decoder_layers(model)
    for index, matrix in maps.items():

        def forward(hidden_states, *args, _matrix=matrix, **kwargs):
            return hidden_states @ _matrix

        layers[index].forward = forward


def logits_of(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits


def mentions_value(message: str, value) -> bool:
    """Check whether ``message`` contains ``value`` as a whole number or word."""
    return re.search(rf"(?<![\w-]){re.escape(str(value))}(?!\w)", message) is not None


# Solvers


def test_solve_ghost_matches_lstsq():
    x_pre, x_post = random_regression(300, 24, seed=0)
    solution = solve_ghost(statistics_of(x_pre, x_post), relative_ridge=0.0)
    expected = torch.linalg.lstsq(x_pre, x_post).solution

    assert solution.solver == "cholesky"
    assert solution.ridge == 0.0
    assert solution.delta.dtype == F64
    assert_close(operator_of(solution), expected, atol=1e-8, rtol=0)


def test_solve_ghost_ridge_closed_form():
    x_pre, x_post = random_regression(300, 24, seed=1)
    stats = statistics_of(x_pre, x_post)
    relative_ridge = 0.5
    solution = solve_ghost(stats, relative_ridge=relative_ridge)

    # The ridge penalises M = W - I: an augmented least-squares problem [X; √λ I] M = [X_post - X_pre; 0].
    ridge = relative_ridge * float((x_pre.square().sum(0)).mean())
    augmented_rows = torch.cat([x_pre, ridge**0.5 * torch.eye(24, dtype=F64)])
    augmented_targets = torch.cat([x_post - x_pre, torch.zeros(24, 24, dtype=F64)])
    expected_delta = torch.linalg.lstsq(augmented_rows, augmented_targets).solution

    assert solution.ridge == pytest.approx(ridge, rel=1e-12)
    assert_close(solution.delta, expected_delta, atol=1e-8, rtol=0)


def test_solve_regularized_ridge_system():
    generator = torch.Generator().manual_seed(2)
    factor = torch.randn(40, 12, generator=generator, dtype=F64)
    matrix = factor.T @ factor
    rhs = torch.randn(12, 5, generator=generator, dtype=F64)

    solution, solver = solve_regularized(matrix, rhs, ridge=3.0)
    expected = torch.linalg.solve(matrix + 3.0 * torch.eye(12, dtype=F64), rhs)

    assert solver == "cholesky"
    assert_close(solution, expected, atol=1e-10, rtol=0)


@pytest.mark.parametrize("relative_ridge", [0.0, 1e-3, 0.5])
def test_solve_ghost_residual_direct(relative_ridge):
    x_pre, x_post = random_regression(300, 24, seed=3)
    solution = solve_ghost(statistics_of(x_pre, x_post), relative_ridge=relative_ridge)
    assert solution.residual == pytest.approx(direct_residual(x_pre, x_post, operator_of(solution)), rel=1e-9)


def test_solve_ghost_huge_ridge_residual():
    x_pre, x_post = random_regression(100, 8, seed=4)
    stats = statistics_of(x_pre, x_post)
    huge_ridge = solve_ghost(stats, relative_ridge=1e12)

    # A huge ridge pins M near zero, which is the plain pruned model with residual 1.
    assert huge_ridge.residual == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("seed", range(8))
def test_solve_ghost_duplicate_columns_fallback(seed):
    x_pre, x_post = random_regression(200, 16, seed=seed)
    x_pre[:, 5] = x_pre[:, 2]
    stats = statistics_of(x_pre, x_post)
    solution = solve_ghost(stats, relative_ridge=0.0)
    minimum_norm = torch.linalg.pinv(stats.XtX, hermitian=True) @ stats.XtDelta

    assert solution.solver != "cholesky"
    assert solution.fallback
    assert torch.isfinite(solution.delta).all()
    assert_close(stats.XtX @ solution.delta, stats.XtDelta, atol=1e-8, rtol=0)
    assert_close(solution.delta, minimum_norm, atol=1e-8, rtol=0)


@pytest.mark.parametrize("seed", range(6))
def test_solve_ghost_few_tokens_fallback(seed):
    # 62 tokens in 64 dimensions give a Gram matrix of rank 62.
    x_pre, x_post = random_regression(62, 64, seed=seed)
    stats = statistics_of(x_pre, x_post)
    solution = solve_ghost(stats, relative_ridge=0.0)
    minimum_norm = torch.linalg.pinv(stats.XtX, hermitian=True) @ stats.XtDelta

    assert solution.solver != "cholesky"
    assert_close(stats.XtX @ solution.delta, stats.XtDelta, atol=1e-8, rtol=0)
    assert_close(solution.delta, minimum_norm, atol=1e-8, rtol=0)


def test_solve_ghost_dead_channel_fallback():
    x_pre, x_post = random_regression(200, 16, seed=9)
    x_pre[:, 7] = 0.0
    stats = statistics_of(x_pre, x_post)
    solution = solve_ghost(stats, relative_ridge=0.0)

    assert solution.solver != "cholesky"
    assert_close(stats.XtX @ solution.delta, stats.XtDelta, atol=1e-8, rtol=0)
    # The minimum-norm solution leaves the row of a channel that is always zero at zero.
    assert torch.count_nonzero(solution.delta[7].abs() > 1e-10) == 0


def test_solve_ghost_empty_raises():
    with pytest.raises(ValueError, match="no calibration tokens"):
        solve_ghost(BoundaryStatistics.zeros(4), relative_ridge=1e-4)


def test_solve_ghost_negative_ridge_raises():
    x_pre, x_post = random_regression(50, 4, seed=5)
    with pytest.raises(ValueError) as error:
        solve_ghost(statistics_of(x_pre, x_post), relative_ridge=-0.5)
    assert mentions_value(str(error.value), -0.5)


# Statistics


def test_statistics_chunks_equal_one_pass():
    x_pre, x_post = random_regression(211, 16, seed=6)
    whole = statistics_of(x_pre, x_post)
    chunked = BoundaryStatistics.zeros(16)
    for rows in (slice(0, 7), slice(7, 120), slice(120, 211)):
        chunked.add(x_pre[rows], x_post[rows])

    assert float(chunked.count) == 211
    for name, tensor in whole.tensors().items():
        assert_close(chunked.tensors()[name], tensor, atol=1e-12, rtol=1e-12, msg=f"field {name}")


def test_statistics_merge_equals_one():
    x_pre, x_post = random_regression(150, 16, seed=7)
    whole = statistics_of(x_pre, x_post)
    first = statistics_of(x_pre[:40], x_post[:40])
    second = statistics_of(x_pre[40:], x_post[40:])
    merged = first.merge_(second)

    assert merged is first
    assert float(merged.count) == 150
    for name, tensor in whole.tensors().items():
        assert_close(merged.tensors()[name], tensor, atol=1e-12, rtol=1e-12, msg=f"field {name}")


def test_statistics_fields_match_definitions():
    x_pre, x_post = random_regression(90, 8, seed=8)
    stats = statistics_of(x_pre.float(), x_post.float())
    x32, y32 = x_pre.float().double(), x_post.float().double()

    assert stats.XtX.dtype == F64
    assert_close(stats.XtX, x32.T @ x32, atol=1e-10, rtol=0)
    assert_close(stats.XtDelta, x32.T @ (y32 - x32), atol=1e-10, rtol=0)
    assert_close(stats.delta_sq, (y32 - x32).square().sum(), atol=1e-10, rtol=0)
    assert_close(stats.abs_pre, x32.abs().sum(0), atol=1e-10, rtol=0)
    assert_close(stats.abs_post, y32.abs().sum(0), atol=1e-10, rtol=0)
    assert float(stats.count) == 90


def test_statistics_merge_extra_mismatch_raises():
    first = BoundaryStatistics.zeros(4)
    second = BoundaryStatistics.zeros(4)
    first.add_extra("gram", torch.ones(4, 4))
    with pytest.raises(ValueError, match="gram"):
        first.merge_(second)


# Exact recovery when the removed layers are linear


def test_recovery_exact_linear_block(tiny_llama, make_batch):
    maps = {1: random_linear_map(HIDDEN_SIZE, seed=11), 2: random_linear_map(HIDDEN_SIZE, seed=12)}
    make_layers_linear(tiny_llama, maps)
    boundaries = boundaries_of([1, 2])
    calibration_batches = [make_batch(4, 32, seed=s) for s in range(2)]
    test_batch = make_batch(2, 20, seed=100)
    dense_logits = logits_of(tiny_llama, test_batch)

    stats = calibrate(tiny_llama, boundaries, lambda: iter(calibration_batches), progress=False)
    solutions = solve_all(stats, boundaries, ["ghost"], relative_ridge=0.0)
    solution = solutions["ghost"]["1-3"]
    recovered = RecoveredModel.build(tiny_llama, [1, 2])
    recovered.add_method("ghost", solutions["ghost"])
    with recovered.variant("ghost") as model:
        ghost_logits = logits_of(model, test_batch)
    with recovered.variant("pruned") as model:
        pruned_logits = logits_of(model, test_batch)

    assert float(stats[0].count) == 2 * 4 * 32
    assert solution.solver == "cholesky"
    assert solution.residual < 1e-9
    assert_close(operator_of(solution), (maps[1] @ maps[2]).double(), atol=1e-6, rtol=0)
    assert not torch.allclose(pruned_logits, dense_logits, atol=1e-2)
    assert_close(ghost_logits, dense_logits, atol=1e-4, rtol=0)


def test_recovery_exact_two_boundaries(tiny_llama, make_batch):
    maps = {index: random_linear_map(HIDDEN_SIZE, seed=20 + index) for index in (1, 2, 4)}
    make_layers_linear(tiny_llama, maps)
    boundaries = boundaries_of([1, 2, 4])
    calibration_batches = [make_batch(4, 32, seed=s) for s in range(2)]
    test_batch = make_batch(2, 20, seed=101)
    dense_logits = logits_of(tiny_llama, test_batch)

    stats = collect_boundary_statistics(tiny_llama, boundaries, calibration_batches, progress=False)
    solutions = {b.name: solve_ghost(s, relative_ridge=0.0) for b, s in zip(boundaries, stats)}
    recovered = RecoveredModel.build(tiny_llama, [1, 2, 4])
    recovered.add_method("ghost", solutions)
    with recovered.variant("ghost") as model:
        ghost_logits = logits_of(model, test_batch)

    assert boundaries == [Boundary(1, 3), Boundary(4, 5)]
    assert recovered.describe_hosts() == {"1-3": "input of pruned layer 1", "4-5": "input of pruned layer 2"}
    assert_close(operator_of(solutions["1-3"]), (maps[1] @ maps[2]).double(), atol=1e-6, rtol=0)
    assert_close(operator_of(solutions["4-5"]), maps[4].double(), atol=1e-6, rtol=0)
    assert_close(ghost_logits, dense_logits, atol=1e-4, rtol=0)


def test_recovery_exact_block_at_end(tiny_llama, make_batch):
    maps = {index: random_linear_map(HIDDEN_SIZE, seed=30 + index) for index in (4, 5)}
    make_layers_linear(tiny_llama, maps)
    boundaries = boundaries_of([4, 5])
    calibration_batches = [make_batch(4, 32, seed=s) for s in range(2)]
    test_batch = make_batch(2, 20, seed=102)
    dense_logits = logits_of(tiny_llama, test_batch)

    stats = collect_boundary_statistics(tiny_llama, boundaries, calibration_batches, progress=False)
    solutions = solve_all(stats, boundaries, ["ghost"], relative_ridge=0.0)
    recovered = RecoveredModel.build(tiny_llama, [4, 5])
    recovered.add_method("ghost", solutions["ghost"])
    with recovered.variant("ghost") as model:
        ghost_logits = logits_of(model, test_batch)

    assert boundaries == [Boundary(4, 6)]
    assert hasattr(final_norm(tiny_llama), ADAPTER_ATTRIBUTE)
    assert recovered.describe_hosts() == {"4-6": "input of the final norm"}
    assert_close(operator_of(solutions["ghost"]["4-6"]), (maps[4] @ maps[5]).double(), atol=1e-6, rtol=0)
    assert_close(ghost_logits, dense_logits, atol=1e-4, rtol=0)


# Padding


def unpadded_rows(batch: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """Split a right-padded batch into one batch per row holding only that row's valid prefix."""
    rows = []
    for row in range(batch["input_ids"].shape[0]):
        length = int(batch["attention_mask"][row].sum())
        ids = batch["input_ids"][row : row + 1, :length]
        rows.append({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    return rows


def test_boundary_statistics_ignore_padding(tiny_llama, make_batch):
    padded = make_batch(2, 16, seed=40, lengths=[16, 9])
    boundaries = [Boundary(1, 3), Boundary(4, 6)]

    from_padded = collect_boundary_statistics(tiny_llama, boundaries, [padded], progress=False)
    from_prefixes = collect_boundary_statistics(tiny_llama, boundaries, unpadded_rows(padded), progress=False)

    for boundary, padded_stats, prefix_stats in zip(boundaries, from_padded, from_prefixes):
        assert float(padded_stats.count) == 25
        for name, tensor in prefix_stats.tensors().items():
            message = f"boundary {boundary.name}, field {name}"
            assert_close(padded_stats.tensors()[name], tensor, atol=1e-8, rtol=1e-5, msg=message)


def test_similarity_statistics_ignore_padding(tiny_qwen2, make_batch):
    padded = make_batch(2, 16, seed=41, lengths=[11, 16])

    from_padded = collect_similarity_statistics(tiny_qwen2, [padded], progress=False)
    from_prefixes = collect_similarity_statistics(tiny_qwen2, unpadded_rows(padded), progress=False)

    assert from_padded.cosine.shape == (NUM_LAYERS + 1, NUM_LAYERS + 1)
    assert float(from_padded.count) == 27
    assert float(from_prefixes.count) == 27
    assert_close(from_padded.cosine, from_prefixes.cosine, atol=1e-8, rtol=1e-5)
    # On the diagonal, arccos of a float32 cosine one rounding step below 1 is about 1e-4, so the
    # diagonal sums are rounding noise and only distances between different states are compared.
    off_diagonal = ~torch.eye(NUM_LAYERS + 1, dtype=torch.bool)
    assert_close(from_padded.angular[off_diagonal], from_prefixes.angular[off_diagonal], atol=1e-6, rtol=1e-5)


# Pruning


def attention_indices(model) -> list[int]:
    return [layer.self_attn.layer_idx for layer in decoder_layers(model)]


def test_pruner_layout(tiny_model):
    pruner = LayerPruner(tiny_model, [1, 2])
    pruner.prune()
    config = tiny_model.config

    assert config.num_hidden_layers == 4
    assert len(decoder_layers(tiny_model)) == 4
    assert base_model(tiny_model).config.num_hidden_layers == 4
    assert attention_indices(tiny_model) == [0, 1, 2, 3]
    assert pruner.new_index(3) == 1


def test_pruner_slices_layer_types(tiny_qwen2):
    pruner = LayerPruner(tiny_qwen2, [1, 2])
    pruner.prune()
    config = tiny_qwen2.config
    kept_indices = [0, 3, 4, 5]

    assert config.layer_types == [QWEN2_LAYER_TYPES[i] for i in kept_indices]
    assert config.max_window_layers == sum(1 for i in kept_indices if i < QWEN2_MAX_WINDOW_LAYERS)
    assert [layer.self_attn.sliding_window for layer in decoder_layers(tiny_qwen2)] == [None, 4, 4, None]


def test_pruner_restore_config(tiny_qwen2):
    pruner = LayerPruner(tiny_qwen2, [0, 4])
    pruner.prune()
    pruner.restore()
    config = tiny_qwen2.config

    assert config.num_hidden_layers == NUM_LAYERS
    assert config.layer_types == QWEN2_LAYER_TYPES
    assert config.max_window_layers == QWEN2_MAX_WINDOW_LAYERS
    assert attention_indices(tiny_qwen2) == list(range(NUM_LAYERS))
    assert len(decoder_layers(tiny_qwen2)) == NUM_LAYERS


def test_pruner_restore_logits(tiny_model, make_batch):
    batch = make_batch(2, 12, seed=50)
    dense_logits = logits_of(tiny_model, batch)
    pruner = LayerPruner(tiny_model, [1, 3])
    pruner.prune()
    pruned_logits = logits_of(tiny_model, batch)
    pruner.restore()
    restored_logits = logits_of(tiny_model, batch)

    assert not torch.equal(pruned_logits, dense_logits)
    assert torch.equal(restored_logits, dense_logits)


def test_pruner_dense_context(tiny_model, make_batch):
    batch = make_batch(2, 12, seed=51)
    dense_logits = logits_of(tiny_model, batch)
    pruner = LayerPruner(tiny_model, [2])
    pruner.prune()
    with pruner.dense() as model:
        inside_logits = logits_of(model, batch)

    assert torch.equal(inside_logits, dense_logits)
    assert pruner.is_pruned
    assert len(decoder_layers(tiny_model)) == NUM_LAYERS - 1


def recovered_with_random_operator(model, removed: list[int], seed: int) -> RecoveredModel:
    """Prune ``model`` and install a random ``ghost`` operator at every boundary."""
    recovered = RecoveredModel.build(model, removed)
    generator = torch.Generator().manual_seed(seed)
    solutions = {}
    for boundary in recovered.boundaries:
        delta = 0.2 * torch.randn(HIDDEN_SIZE, HIDDEN_SIZE, generator=generator, dtype=F64) / HIDDEN_SIZE**0.5
        solutions[boundary.name] = Solution(delta=delta, ridge=0.0, solver="cholesky", residual=0.0)
    recovered.add_method("ghost", solutions)
    return recovered


@pytest.mark.parametrize("variant", ["pruned", "ghost"])
def test_generate_cache_matches_no_cache(tiny_model, make_batch, variant):
    prompt = make_batch(2, 6, seed=60)
    recovered = recovered_with_random_operator(tiny_model, [1, 2, 5], seed=61)

    with recovered.variant(variant) as model, torch.no_grad():
        cached = model.generate(**prompt, max_new_tokens=8, do_sample=False, use_cache=True)
        uncached = model.generate(**prompt, max_new_tokens=8, do_sample=False, use_cache=False)

    assert cached.shape == (2, 14)
    assert torch.equal(cached, uncached)


@pytest.mark.parametrize("variant", ["pruned", "ghost"])
def test_cached_steps_match_full_forward(tiny_model, make_batch, variant):
    # 14 positions exceed the sliding window of 4, so the Qwen2 sliding-window cache layers evict keys.
    sequence = make_batch(2, 14, seed=62)["input_ids"]
    recovered = recovered_with_random_operator(tiny_model, [1, 2, 5], seed=63)

    with recovered.variant(variant) as model, torch.no_grad():
        full_logits = model(input_ids=sequence, use_cache=False).logits
        output = model(input_ids=sequence[:, :6], use_cache=True)
        step_logits = [output.logits]
        for position in range(6, sequence.shape[1]):
            output = model(input_ids=sequence[:, position : position + 1], cache=output.cache, use_cache=True)
            step_logits.append(output.logits)

    assert_close(torch.cat(step_logits, dim=1), full_logits, atol=1e-5, rtol=0)


# Operators


def test_identity_operator_bit_identical(tiny_model, make_batch):
    batch = make_batch(2, 12, seed=70)
    recovered = RecoveredModel.build(tiny_model, [2, 3, 5])
    zeros = torch.zeros(HIDDEN_SIZE, HIDDEN_SIZE, dtype=F64)
    identity = {b.name: Solution(delta=zeros, ridge=0.0, solver="cholesky", residual=1.0) for b in recovered.boundaries}
    recovered.add_method("ghost", identity)

    with recovered.variant("pruned") as model:
        pruned_logits = logits_of(model, batch)
    with recovered.variant("ghost") as model:
        active = [adapter.active for adapter in recovered.adapters.values()]
        identity_logits = logits_of(model, batch)

    assert active == ["ghost", "ghost"]
    assert torch.equal(identity_logits, pruned_logits)


def test_variant_dense_restores_layout(tiny_model, make_batch):
    batch = make_batch(2, 12, seed=71)
    dense_logits = logits_of(tiny_model, batch)
    recovered = recovered_with_random_operator(tiny_model, [1, 4], seed=72)

    with recovered.variant("dense") as model:
        inside_logits = logits_of(model, batch)

    assert torch.equal(inside_logits, dense_logits)
    assert len(decoder_layers(tiny_model)) == NUM_LAYERS - 2
    assert recovered.variants == ["dense", "pruned", "ghost"]


def test_variant_unknown_method_raises(tiny_llama):
    recovered = recovered_with_random_operator(tiny_llama, [2], seed=73)
    with pytest.raises(KeyError, match="lora"):
        with recovered.variant("lora"):
            pass
    assert [adapter.active for adapter in recovered.adapters.values()] == [None]


# Selection


def similarity_from_cosine(cosine: torch.Tensor) -> SimilarityStatistics:
    """Build statistics of one token with mean cosine ``cosine`` and the angular distance it implies."""
    cosine = cosine.to(F64)
    angular = torch.arccos(cosine.clamp(-1, 1)) / torch.pi
    return SimilarityStatistics(cosine=cosine.clone(), angular=angular, count=torch.tensor(1.0, dtype=F64))


def block_cosine(num_layers: int, best: tuple[int, int], value: float = 0.95) -> torch.Tensor:
    """Build a cosine matrix of 0.5 everywhere except ``value`` at the pair ``best`` and 1 on the diagonal."""
    cosine = torch.full((num_layers + 1, num_layers + 1), 0.5, dtype=F64)
    cosine.fill_diagonal_(1.0)
    cosine[best] = cosine[best[::-1]] = value
    return cosine


@pytest.mark.parametrize(
    "num_remove, start",
    [(2, 0), (2, 4), (3, 3), (1, 5), (5, 0), (5, 1)],
)
def test_select_contiguous_cosine(num_remove, start):
    stats = similarity_from_cosine(block_cosine(NUM_LAYERS, (start, start + num_remove)))
    selection = select_contiguous(stats, num_remove, criterion="cosine")

    assert selection.removed == list(range(start, start + num_remove))
    assert selection.chosen == [f"{start}-{start + num_remove}"]
    assert len(selection.candidates) == NUM_LAYERS - num_remove + 1
    assert selection.higher_is_better


@pytest.mark.parametrize("num_remove, start", [(2, 0), (2, 4), (3, 2)])
def test_select_contiguous_angular(num_remove, start):
    stats = similarity_from_cosine(block_cosine(NUM_LAYERS, (start, start + num_remove)))
    selection = select_contiguous(stats, num_remove, criterion="angular")

    assert selection.removed == list(range(start, start + num_remove))
    assert selection.scores[start] == min(selection.scores)
    assert not selection.higher_is_better


def test_select_angular_differs_from_cosine():
    # Cosine sums and angular sums are separate statistics, so the two criteria can disagree.
    cosine = block_cosine(NUM_LAYERS, (1, 3))
    stats = similarity_from_cosine(cosine)
    stats.angular.fill_(0.4)
    stats.angular[3, 5] = stats.angular[5, 3] = 0.1

    assert select_contiguous(stats, 2, criterion="cosine").removed == [1, 2]
    assert select_contiguous(stats, 2, criterion="angular").removed == [3, 4]


def test_select_block_influence_lowest():
    cosine = block_cosine(NUM_LAYERS, (0, 1), value=0.99)
    for index, value in {1: 0.6, 2: 0.7, 3: 0.97, 4: 0.8, 5: 0.98}.items():
        cosine[index, index + 1] = cosine[index + 1, index] = value
    selection = select_block_influence(similarity_from_cosine(cosine), 3)

    assert selection.removed == [0, 3, 5]
    assert selection.chosen == ["0", "3", "5"]
    assert selection.scores[0] == pytest.approx(0.01)


@pytest.mark.parametrize("num_remove", [0, -1, NUM_LAYERS, NUM_LAYERS + 2])
def test_select_invalid_block_size_raises(num_remove):
    stats = similarity_from_cosine(block_cosine(NUM_LAYERS, (0, 1)))
    for select in (
        lambda: select_contiguous(stats, num_remove, criterion="cosine"),
        lambda: select_block_influence(stats, num_remove),
    ):
        with pytest.raises(ValueError) as error:
            select()
        assert mentions_value(str(error.value), num_remove)


def test_select_invalid_criterion_raises():
    stats = similarity_from_cosine(block_cosine(NUM_LAYERS, (0, 1)))
    with pytest.raises(ValueError) as error:
        select_layers(stats, "euclidean", num_remove=2)
    assert mentions_value(str(error.value), "euclidean")


@pytest.mark.parametrize(
    "removed, value",
    [
        ([1, 1], 1),
        ([2, 4, 2], 2),
        ([6], 6),
        ([-1], -1),
        ([0, 9], 9),
        ([0, 1, 2, 3, 4, 5], 6),
    ],
)
def test_validate_removed_layers_raises(removed, value):
    with pytest.raises(ValueError) as error:
        validate_removed_layers(removed, NUM_LAYERS)
    assert mentions_value(str(error.value), value)


def test_validate_removed_layers_empty_raises():
    with pytest.raises(ValueError, match="No layers to remove"):
        validate_removed_layers([], NUM_LAYERS)


def test_validate_removed_layers_sorts():
    assert validate_removed_layers([4, 0, 2], NUM_LAYERS) == [0, 2, 4]


def test_pruner_rejects_invalid_layers(tiny_llama):
    with pytest.raises(ValueError) as error:
        LayerPruner(tiny_llama, [7])
    assert mentions_value(str(error.value), 7)
    assert len(decoder_layers(tiny_llama)) == NUM_LAYERS


# Early stop of calibration passes


class ForwardRecorder:
    """Forward hooks that record which decoder layers ran and whether the norm or LM head ran."""

    def __init__(self, model):
        self.layers_run: list[int] = []
        self.norm_ran = False
        self.head_ran = False
        self.handles = []
        for index, layer in enumerate(decoder_layers(model)):
            self.handles.append(layer.register_forward_hook(self._layer_hook(index)))
        self.handles.append(final_norm(model).register_forward_hook(self._set("norm_ran")))
        self.handles.append(model.get_output_embeddings().register_forward_pre_hook(self._set("head_ran")))

    def _layer_hook(self, index: int):
        def hook(module, args, output):
            self.layers_run.append(index)

        return hook

    def _set(self, attribute: str):
        def hook(module, *args):
            setattr(self, attribute, True)

        return hook

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


@pytest.mark.parametrize(
    "removed, expected_run",
    [
        ([1, 2], [0, 1, 2]),
        ([1, 2, 4], [0, 1, 2, 3, 4]),
        ([0], [0]),
    ],
)
def test_boundary_pass_stops_early(tiny_llama, make_batch, removed, expected_run):
    recorder = ForwardRecorder(tiny_llama)
    batches = [make_batch(2, 8, seed=80), make_batch(2, 8, seed=81)]
    collect_boundary_statistics(tiny_llama, boundaries_of(removed), batches, progress=False)
    recorder.remove()

    assert recorder.layers_run == expected_run * 2
    assert not recorder.norm_ran
    assert not recorder.head_ran


def test_boundary_pass_end_skips_head(tiny_llama, make_batch):
    recorder = ForwardRecorder(tiny_llama)
    collect_boundary_statistics(tiny_llama, boundaries_of([4, 5]), [make_batch(2, 8, seed=82)], progress=False)
    recorder.remove()

    assert recorder.layers_run == list(range(NUM_LAYERS))
    assert not recorder.norm_ran
    assert not recorder.head_ran


def test_similarity_pass_skips_head(tiny_llama, make_batch):
    recorder = ForwardRecorder(tiny_llama)
    collect_similarity_statistics(tiny_llama, [make_batch(2, 8, seed=83)], progress=False)
    recorder.remove()

    assert recorder.layers_run == list(range(NUM_LAYERS))
    assert not recorder.norm_ran
    assert not recorder.head_ran


def test_calibration_removes_hooks(tiny_llama, make_batch):
    batch = make_batch(2, 8, seed=84)
    before = logits_of(tiny_llama, batch)
    collect_boundary_statistics(tiny_llama, boundaries_of([1, 2]), [batch], progress=False)
    collect_similarity_statistics(tiny_llama, [batch], progress=False)

    assert all(not layer._forward_pre_hooks for layer in decoder_layers(tiny_llama))
    assert not final_norm(tiny_llama)._forward_pre_hooks
    assert torch.equal(logits_of(tiny_llama, batch), before)
