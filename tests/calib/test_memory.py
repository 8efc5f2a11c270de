"""Bounded memory: activation caches on disk beyond a budget, identical results, stage timings."""
import copy
from pathlib import Path

import pytest
import torch

from fade_kernels import QuantConfig, quantize_model
from fade_kernels.api import StageTimer
from fade_kernels.memory.cache import ActivationCache, load, materialize, parse_size

from test_resume import assert_identical, quantized_tensors, short_samples, short_whisper

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("text,expected", [("4GB", 4 * 10**9), ("512MiB", 512 * 2**20), ("1.5g", 1_500_000_000),
                                           (" 100 kb ", 100_000), ("0", 0), (123, 123), (None, None)])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("bad", ["4 parsecs", "GB", "-1GB", -5, True])
def test_parse_size_rejects(bad):
    with pytest.raises(ValueError, match="max_memory"):
        parse_size(bad)


def mapped_files() -> str:
    return Path("/proc/self/maps").read_text()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int32])
def test_cache_spills_beyond_budget_and_maps_back_exactly(dtype, tmp_path):
    generator = torch.Generator().manual_seed(0)
    tensors = [(torch.randn(3, 17, 5, generator=generator) * 100).to(dtype) for _ in range(3)]
    nbytes = tensors[0].numel() * tensors[0].element_size()
    cache = ActivationCache(max_bytes=2 * nbytes, directory=tmp_path)
    entries = [cache.put(t) for t in tensors]
    assert [e.on_disk for e in entries] == [False, False, True]
    assert cache.ram_bytes == 2 * nbytes and cache.disk_bytes == nbytes == cache.spilled_bytes
    assert entries[0].get() is tensors[0]
    back = entries[2].get()
    assert back.dtype == dtype and back.shape == tensors[2].shape and torch.equal(back, tensors[2])
    assert str(entries[2].path) in mapped_files()   # a memory map, not a read into RAM
    # Releasing a RAM entry makes room: the replacement of an on-disk entry now fits in RAM.
    cache.release(entries[0])
    replaced = cache.put(tensors[2] + 1, replaces=entries[2])
    assert not replaced.on_disk and not entries[2].path.exists() and cache.disk_bytes == 0
    cache.release(entries[2])   # twice: harmless
    folder = entries[2].path.parent
    cache.close()
    assert not folder.exists()


def test_cache_with_zero_budget_and_empty_tensor(tmp_path):
    cache = ActivationCache(max_bytes=0, directory=tmp_path)
    assert not cache.put(torch.zeros(0, 4)).on_disk   # 0 bytes fit any budget
    empty = cache._spill(torch.zeros(0, 4), 0)
    assert empty.on_disk and empty.get().shape == (0, 4)
    x = torch.arange(6.0).reshape(2, 3)
    call = {"hidden_states": cache.put(x), "flag": True, "mask": None}
    got = materialize(call)
    assert torch.equal(got["hidden_states"], x) and got["flag"] is True and got["mask"] is None
    assert load(x) is x
    cache.close()
    with pytest.raises(ValueError, match="max_bytes"):
        ActivationCache(max_bytes=-1)


@pytest.mark.slow
@pytest.mark.parametrize("method,budget", [("fade", 0), ("qep", "150KB"), ("gptq", 0)])
def test_results_on_disk_equal_results_in_ram(method, budget, tmp_path):
    """Every cache (both chains' inputs, encoder outputs, the twin's group inputs) through files, or
    a budget that keeps some of them in RAM: the same codes and report, bit for bit."""
    base, samples = short_whisper(), short_samples()
    config = QuantConfig(method=method, bits=3, group_size=32)
    in_ram = copy.deepcopy(base)
    expected = quantize_model(in_ram, samples, config, batch_size=2, progress=False, track_fp_error=True)
    on_disk = copy.deepcopy(base)
    report = quantize_model(on_disk, samples, config, batch_size=2, progress=False, track_fp_error=True,
                            max_memory=budget, offload_dir=tmp_path)
    assert expected.offloaded_mb == 0 and report.offloaded_mb > 0
    assert_identical(quantized_tensors(on_disk), quantized_tensors(in_ram))
    assert [vars(layer) for layer in report.layers] == [vars(layer) for layer in expected.layers]
    assert list(tmp_path.iterdir()) == []   # the spill folder is removed


@pytest.mark.slow
def test_offload_folder_defaults_into_the_resume_folder(tmp_path, monkeypatch):
    seen = []
    original = ActivationCache._spill

    def recording(self, tensor, nbytes):
        entry = original(self, tensor, nbytes)
        seen.append(entry.path)
        return entry

    monkeypatch.setattr(ActivationCache, "_spill", recording)
    quantize_model(short_whisper(), short_samples(n=2), QuantConfig(method="gptq", bits=4, group_size=32),
                   batch_size=2, progress=False, max_memory=0, checkpoint_dir=tmp_path / "resume")
    assert seen and all(path.parent.parent == tmp_path / "resume" / "activations" for path in seen)
    assert not (tmp_path / "resume").exists()


def test_stage_timer_times_the_solver_through_the_current_timer_only():
    from fade_kernels.solver.gptq import gptq_quantize
    from fade_kernels.timing import timing

    timer, idle = StageTimer(), StageTimer()
    with timing(timer):
        with timer("solve"):
            gptq_quantize(torch.randn(8, 64), torch.eye(64), bits=4, group_size=32)
    assert timer.seconds["sweep"] > 0 and timer.seconds["factorisation"] > 0 and timer.seconds["solve"] >= 0
    gptq_quantize(torch.randn(8, 64), torch.eye(64), bits=4, group_size=32)   # no current timer: not timed
    assert sum(idle.seconds.values()) == 0


def test_stage_timers_of_two_threads_stay_apart():
    """Each thread times into the timer it made current; the other thread's stages never leak in."""
    import threading

    from fade_kernels.solver.gptq import gptq_quantize
    from fade_kernels.timing import timing

    timers = [StageTimer(), StageTimer()]
    errors = []

    def work(index):
        try:
            with timing(timers[index]):
                for _ in range(3):
                    gptq_quantize(torch.randn(8, 64), torch.eye(64), bits=4, group_size=32)
        except Exception as error:   # reported below: an assertion in a thread would be lost
            errors.append(error)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    with timers[0]("solve"):
        for thread in threads:
            thread.join()
    assert not errors
    for timer in timers:
        assert timer.seconds["sweep"] > 0 and timer.seconds["factorisation"] > 0
    # The main thread's open "solve" stage of timers[0] was not charged the threads' nested stages.
    assert timers[0].seconds["solve"] > 0
    with pytest.raises(ValueError, match="stage must be one of"):
        with timers[0]("lunch"):
            pass


@pytest.mark.slow
def test_report_has_seconds_per_stage():
    report = quantize_model(short_whisper(), short_samples(n=2), QuantConfig(method="gptq", bits=4, group_size=32),
                            batch_size=2, progress=False)
    stages = report.stage_seconds
    assert set(stages) == set(StageTimer.STAGES)
    for name in ("capture", "forward", "statistics", "factorisation", "sweep", "packing"):
        assert stages[name] > 0, name
    assert sum(stages.values()) <= report.seconds
    assert report.to_dict()["stage_seconds"] == stages
    assert "seconds per stage" in report.summary() or max(stages.values()) < 0.05


def file_ranges(path) -> list[tuple[int, int]]:
    ranges = []
    for line in mapped_files().splitlines():
        if line.endswith(str(path)):
            start, end = line.split()[0].split("-")
            ranges.append((int(start, 16), int(end, 16)))
    return ranges


@pytest.mark.slow
def test_blocks_not_yet_processed_stay_memory_mapped(tmp_path):
    """from_pretrained memory-maps a float32 safetensors file; the pipeline must not copy the
    weights of blocks it has not reached (only the current block is written and packed)."""
    from transformers import WhisperForConditionalGeneration

    from fade_kernels.api import PipelineObserver

    short_whisper().save_pretrained(tmp_path)
    model = WhisperForConditionalGeneration.from_pretrained(tmp_path, dtype=torch.float32).eval()
    weights_file = (tmp_path / "model.safetensors").resolve()

    def mapped(tensor) -> bool:
        return any(a <= tensor.data_ptr() < b for a, b in file_ranges(weights_file))

    later = [model.model.encoder.layers[1].fc1.weight, model.model.decoder.layers[0].fc1.weight,
             model.model.decoder.layers[1].encoder_attn.k_proj.weight]
    assert all(mapped(w) for w in later), "transformers no longer memory-maps float32 safetensors"
    seen = []

    class Checking(PipelineObserver):
        def block_packed(self, block_name, block):
            seen.append([mapped(w) for w in later])

    quantize_model(model, short_samples(n=2), QuantConfig(method="qep", bits=4, group_size=32), batch_size=2,
                   progress=False, observer=Checking())
    # After encoder block 0 all three are untouched; each turns into a QuantLinear once its block is done.
    assert seen[0] == [True, True, True] and seen[1][1:] == [True, True] and seen[2][2] is True


def resident_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS in /proc/self/status")


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="Linux only")
def test_release_file_pages_hands_back_mapped_pages_and_leaves_the_heap_alone(tmp_path):
    from fade_kernels.memory.mapped import release_file_pages

    n = 4 << 20                                  # 16 MiB of float32
    expected = torch.arange(n, dtype=torch.float32)
    path = tmp_path / "weights.bin"
    expected.numpy().tofile(path)
    mapped = torch.from_file(str(path), shared=False, size=n, dtype=torch.float32)   # MAP_PRIVATE, like safetensors
    assert torch.equal(mapped, expected)         # every page is now resident
    mapped[0] = -1.0                             # a copy-on-write page, like a dequantized weight written in place
    before = resident_kib()
    released = release_file_pages([mapped])
    after = resident_kib()
    assert released >= 16 * 2**20 - 2 * 4096
    assert before - after >= 12 * 1024, (before, after)
    # What is read afterwards is the file again: the written value is gone (hence: only release
    # weights nothing will read).
    assert float(mapped[0]) == 0.0 and torch.equal(mapped, expected)

    heap = torch.randn(1 << 20)
    copy_of_heap = heap.clone()
    assert release_file_pages([heap, torch.empty(0)]) == 0
    assert torch.equal(heap, copy_of_heap)


@pytest.mark.slow
def test_packed_blocks_give_back_their_mapped_weights_with_identical_results(tmp_path):
    """A memory-mapped model (from_pretrained) and an in-RAM copy of it quantize to the same
    tensors; only the mapped one releases pages."""
    from transformers import WhisperForConditionalGeneration

    short_whisper().save_pretrained(tmp_path)
    mapped = WhisperForConditionalGeneration.from_pretrained(tmp_path, dtype=torch.float32).eval()
    in_ram = copy.deepcopy(mapped)
    samples = short_samples(n=2)
    config = QuantConfig(method="gptq", bits=4, group_size=32)
    reports = [quantize_model(m, samples, config, batch_size=2, progress=False) for m in (mapped, in_ram)]
    assert reports[0].released_mb > 0 and reports[1].released_mb == 0
    assert_identical(quantized_tensors(mapped), quantized_tensors(in_ram))


@pytest.mark.slow
@pytest.mark.parametrize("family,method", [("whisper", "gptq"), ("whisper", "awq"), ("moonshine", "fade")])
def test_replaying_quantized_linear_outputs_changes_nothing(family, method, tiny_whisper, tiny_moonshine):
    """Later passes over a block reuse the outputs of its already-solved linears; the result must
    equal recomputing them (budget 0), including AWQ, which rescales a solved v_proj afterwards."""
    from fade_kernels.api import MEMO_BUDGET_BYTES, PipelineObserver

    from test_pipeline import moonshine_samples, whisper_samples

    model = tiny_whisper if family == "whisper" else tiny_moonshine
    samples = whisper_samples() if family == "whisper" else moonshine_samples()
    config = QuantConfig(method=method, bits=3, group_size=32)
    replayed, names, resolved = [], set(), []

    class Counting(PipelineObserver):
        def memo_closed(self, block_name, memo):
            replayed.append(len(memo.outputs))
            names.update(memo.replayed_names())
            resolved.extend(memo.resolved)

    results = []
    for budget in (MEMO_BUDGET_BYTES, 0):
        replayed.clear()
        resolved.clear()
        quantized = copy.deepcopy(model)
        quantize_model(quantized, samples, config, batch_size=4, progress=False, memo_budget=budget,
                       observer=Counting())
        assert (min(replayed) > 0) if budget else (max(replayed) == 0 and not resolved)
        if budget:
            # Whole attention modules are replayed once their four linears are solved, and the
            # encoder's activation function once its input (fc1's output) is replayed.
            assert {"self_attn", "encoder_attn"} <= names, names
            assert any(name.endswith("activation_fn") for name in names), names
            # The attention output recorded in out_proj's statistics pass was completed later
            # (AWQ drops it when it rescales v_proj, so it is not asserted there).
            if method != "awq":
                assert "self_attn" in resolved and (family != "whisper" or "encoder_attn" in resolved), resolved
        names.clear()
        results.append(quantized_tensors(quantized))
        # The wrapped forwards are gone: every remaining nn.Linear runs its class forward again.
        assert all("forward" not in vars(m) for m in quantized.modules() if isinstance(m, torch.nn.Linear))
    assert_identical(*results)
