"""benchmarks/e2e.py's targets table: what a run measured is scored, what it did not run is said so (never
scored as a miss), and the longest-sequence target falls back to the memory-slope extrapolation."""
from benchmarks import e2e


def test_targets_score_what_ran_and_mark_what_did_not():
    res = {"settings": {"b": {"primary": {"speed_ratio": 1.4, "memory_ratio": 0.59}}}}
    by = {x["name"]: x for x in e2e.targets(res)}
    b_speed = [x for n, x in by.items() if n.startswith("(b)") and "tokens/s" in n][0]
    b_mem = [x for n, x in by.items() if n.startswith("(b)") and "memory" in n][0]
    assert b_speed["met"] is False and b_speed["measured"] == 1.4
    assert b_mem["met"] is True
    for n, x in by.items():
        if n.startswith("(a)") or n.startswith("longest") or n.startswith("50-step"):
            assert x["met"] is None and "not run" in x["note"], n
    assert any(n.startswith("(a)") for n in by)                    # listed, though not run


def test_longest_uses_the_extrapolated_ratio_and_losscheck_its_bound():
    res = {"settings": {}, "losscheck": {"max_abs_diff": 0.02},
           "longest": {"ours": {"mode": "slope", "extrapolated_by_peak_memory": 1000, "longest_fit": 32768},
                       "hf": {"mode": "slope", "extrapolated_by_peak_memory": 200, "longest_fit": 32768}}}
    by = {x["name"]: x for x in e2e.targets(res)}
    lo = [x for n, x in by.items() if n.startswith("longest")][0]
    assert lo["measured"] is None and lo["extrapolated_ratio_by_peak_memory"] == 5.0 and lo["met"] is True
    lc = [x for n, x in by.items() if n.startswith("50-step")][0]
    assert lc["met"] is False and lc["measured"] == 0.02
    res["longest"]["ours"]["extrapolated_by_peak_memory"] = 700
    lo = [x for x in e2e.targets(res) if x["name"].startswith("longest")][0]
    assert lo["met"] is False                                      # 3.5x < 4


def test_partial_checkpointing_variants_from_the_measured_peaks():
    """The k-layer variant keeps as many layers' activations as fit 0.6x HF's peak between the measured
    extremes; the CUDA-graph one also fits the graph's measured overhead, so it checkpoints more layers."""
    entry = {"hf": {"peak_gib": 14.45}, "ours+ckpt-offload": {"peak_gib": 4.02}, "ours": {"peak_gib": 10.0},
             "ours+graph": {"peak_gib": 10.24}}
    eager = e2e.partial_variant(entry, 32)
    graph = e2e.partial_variant(entry, 32, graph=True)
    assert eager["name"] == "ours+ckpt-8of32" and eager["predicted_peak_gib"] <= 0.6 * 14.45
    assert graph["name"] == "ours+graph+ckpt-9of32" and graph["graph"] is True
    assert graph["predicted_peak_gib"] <= 0.6 * 14.45 < graph["predicted_peak_gib"] + 0.19
    del entry["ours+graph"]
    assert e2e.partial_variant(entry, 32, graph=True) is None         # no graph peak measured: no guess


def test_results_name_the_host_cpu():
    """The host that launches the kernels is recorded (HF's host-bound (a) step varies with it between machines)."""
    h = e2e.host_info()
    assert set(h) == {"cpu", "cores"} and isinstance(h["cpu"], str) and h["cpu"] and h["cores"] >= 1


def test_timing_window_median_and_spread():
    from benchmarks.e2e import UNSETTLED, window_stats

    # 8075066's (b) run: steps 4-8 still settling
    med, spread = window_stats([8.6534, 0.921, 0.828, 0.837, 0.7483, 0.7398, 0.6856, 0.6983])
    assert med == 0.7398 and round(spread, 3) == 1.221 and spread > UNSETTLED
    med, spread = window_stats([7.4688, 0.7243, 0.7131, 0.7112, 0.7032, 0.7485, 0.698, 0.7078])
    assert med == 0.7078 and spread < UNSETTLED               # 849cadd: one slower step, settled
    assert window_stats([3.0, 1.0, 2.0, 2.0]) == (2.0, 1.0)          # fewer than 8: the second half


def test_partial_variant_over_the_goal_gets_one_more_layer():
    """A partial variant whose measured peak is over 0.6x HF's is rerun with one more checkpointed layer (the
    graphed one's overhead grows with its offloaded layers); one at or under the goal, a non-partial variant, or
    one that would checkpoint every layer is not."""
    v = dict(name="ours+graph+ckpt-9of32", checkpointing=9, offload=True, graph=True, predicted_peak_gib=8.56)
    entry = {"hf": {"peak_gib": 14.45}, v["name"]: {"peak_gib": 8.69}}
    more = e2e.one_more_checkpointed(entry, v, 32)
    assert more["name"] == "ours+graph+ckpt-10of32" and more["checkpointing"] == 10 and more["graph"]
    assert more["retry_of"] == v["name"]
    entry[v["name"]]["peak_gib"] = 8.67                              # 0.59999x: holds
    assert e2e.one_more_checkpointed(entry, v, 32) is None
    full = dict(name="ours+ckpt-offload", checkpointing=True, offload=True)
    entry[full["name"]] = {"peak_gib": 9.0}
    assert e2e.one_more_checkpointed(entry, full, 32) is None        # not a partial variant
    last = dict(v, name="ours+graph+ckpt-31of32", checkpointing=31)
    entry[last["name"]] = {"peak_gib": 9.5}
    assert e2e.one_more_checkpointed(entry, last, 32) is None        # the next would be the full variant


def test_saved_offload_variant_from_the_measured_peaks():
    """The offloading variant offloads as many layers' saved activations as bring the peak without checkpointing
    (graphed or eager) down to 0.6x HF's, at the per-layer size between the measured extremes; over the goal
    once measured, it is rerun with one more layer offloaded."""
    entry = {"hf": {"peak_gib": 14.45}, "ours+ckpt-offload": {"peak_gib": 4.03}, "ours": {"peak_gib": 10.03},
             "ours+graph": {"peak_gib": 10.25}}
    per_layer = (10.03 - 4.03) / 32
    graph = e2e.saved_offload_variant(entry, 32, graph=True)
    assert graph["name"] == "ours+graph+offload-9of32" and graph["offload_saved"] == 9 and graph["graph"]
    assert graph["checkpointing"] is False and graph["predicted_peak_gib"] <= 0.6 * 14.45
    assert 10.25 - 8 * per_layer > 0.6 * 14.45                       # one layer fewer would not do
    eager = e2e.saved_offload_variant(entry, 32)
    assert eager["name"] == "ours+offload-8of32" and not eager["graph"]
    entry[graph["name"]] = {"peak_gib": 8.8}
    more = e2e.one_more_checkpointed(entry, graph, 32)
    assert more["name"] == "ours+graph+offload-10of32" and more["offload_saved"] == 10
    assert more["checkpointing"] is False and more["retry_of"] == graph["name"]
    entry["ours"]["peak_gib"] = 8.0                                  # already under the goal: nothing to offload
    assert e2e.saved_offload_variant(entry, 32) is None
    del entry["ours+graph"]
    assert e2e.saved_offload_variant(entry, 32, graph=True) is None


def test_mixed_variant_offloads_what_the_link_carries_and_checkpoints_the_rest():
    """H100 49700e7's (a) numbers: 9 layers must go; a 116.7 ms graphed step's forward carries about 8 layers'
    saved tensors over a 50 GB/s link, so 7 are offloaded (one of margin) and 2 checkpointed; over the goal once
    measured, one more layer is checkpointed. Where the link carries them all there is no mixed variant."""
    entry = {"hf": {"peak_gib": 14.45}, "ours+ckpt-offload": {"peak_gib": 4.03}, "ours": {"peak_gib": 10.03},
             "ours+graph": {"peak_gib": 10.25, "step_s": 0.1167}}
    v = e2e.mixed_offload_variant(entry, 32)
    assert v["name"] == "ours+graph+ckpt-2of32+offload-7of32"
    assert (v["checkpointing"], v["offload_saved"], v["offload"], v["graph"]) == (2, 7, True, True)
    assert v["predicted_peak_gib"] <= 0.6 * 14.45
    entry[v["name"]] = {"peak_gib": 8.8}
    more = e2e.one_more_checkpointed(entry, v, 32)
    assert more["name"] == "ours+graph+ckpt-3of32+offload-7of32" and more["checkpointing"] == 3
    assert more["offload_saved"] == 7
    entry["ours+graph"]["step_s"] = 1.0                              # a slow step: the link carries every layer
    assert e2e.mixed_offload_variant(entry, 32) is None


def test_ab_adds_control_is_timed_but_never_scored():
    """--ab-adds: the control variant runs with the fast path's adds as separate kernels (recorded in its
    memory_saving), the switches come back on afterwards, and the primary stays a default-configured variant even
    where the control is faster."""
    import torch

    import llama.fast_path as fp
    from benchmarks import e2e

    args = e2e.model_args("tiny")
    res, _ = e2e.run_stack("ours", args, torch.device("cpu"), "b", e2e.AB_ADDS["b"], 4, True)
    assert res["memory_saving"]["sibling_nodes"] is False and res["memory_saving"]["residual_norm_nodes"] is False
    assert res["control"] and fp.GROUP_SIBLINGS and fp.FUSE_RESIDUAL_NORMS
    entry = {"hf": dict(tokens_per_s=100.0, peak_gib=10.0),
             "ours": dict(name="ours", tokens_per_s=150.0, peak_gib=5.0),
             "ours [adds separate]": dict(name="ours [adds separate]", tokens_per_s=160.0, peak_gib=5.0,
                                          control="A/B")}
    e2e.summarize_setting(entry)
    assert entry["primary"]["name"] == "ours" and entry["ours [adds separate]"]["speed_ratio"] == 1.6


def test_ab_prefetch_control_switches_the_prefetch_for_its_run_only():
    """--ab-prefetch: the control variant runs with kernels.prefetch.ENABLED switched from its default (recorded in
    its memory_saving), and the default comes back afterwards."""
    import torch

    from benchmarks import e2e
    from kernels import prefetch

    default = prefetch.ENABLED
    v = e2e._ab_prefetch("b")
    assert v["prefetch"] is (not default) and v["control"]
    res, _ = e2e.run_stack("ours", e2e.model_args("tiny"), torch.device("cpu"), "b", v, 3, True)
    assert res["memory_saving"]["dequant_prefetch"] is (not default) and res["control"]
    assert prefetch.ENABLED is default
