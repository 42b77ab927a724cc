"""dsv4.kernels.compile: the compile helpers touch what they should and nothing else, and compiled training blocks
report the same statistics as eager ones without graph breaks or recompiles once warm."""

import copy
import types

import pytest
import torch
import torch._dynamo.config as dynamo_config
from torch._dynamo.utils import counters

from dsv4.kernels.compile import allow_recompiles, compile_blocks, compile_hot_paths, compile_scan, compiled
from dsv4.model.indexer import Indexer, scan_block
from dsv4.model.stats import TrainStats
from dsv4.train.loss import training_loss
from tests.helpers import FEW_SINKHORN, random_ids, random_model


def test_allow_recompiles_only_raises_the_limit():
    before = dynamo_config.recompile_limit
    try:
        allow_recompiles(before + 5)
        assert dynamo_config.recompile_limit == before + 5
        allow_recompiles(1)
        assert dynamo_config.recompile_limit == before + 5
    finally:
        dynamo_config.recompile_limit = before


def test_compile_scan_shares_one_compiled_block_and_leaves_the_plain_one():
    model = random_model()
    indexers = [m for m in model.modules() if isinstance(m, Indexer)]
    assert indexers and all(ix.scan_block is scan_block for ix in indexers)  # plain until prepared
    compile_scan(model)
    compile_scan(model)  # a second preparation compiles nothing new
    assert all(ix.scan_block is compiled(scan_block) for ix in indexers)
    assert Indexer.scan_block is scan_block and compiled(scan_block) is not scan_block


def test_compile_hot_paths_compiles_exactly_the_listed_methods():
    model = compile_hot_paths(copy.deepcopy(random_model()))
    listed = {(type(m).__name__, name) for m in model.modules() for name in getattr(m, "hot_paths", ())}
    assert listed == {("HyperConnection", "forward"), ("HyperConnection", "post"), ("Attention", "attend"),
                      ("Experts", "act")}
    for m in model.modules():
        own = {name for name, value in vars(m).items() if isinstance(value, types.FunctionType)}
        assert own == set(getattr(m, "hot_paths", ())), type(m).__name__


@pytest.mark.slow
def test_compiled_blocks_report_what_eager_blocks_report_without_recompiling():
    """The statistics object passes through compiled blocks as graph outputs: same loads, balance statistics and
    indexer KLs as eager, no graph break; the indexer's switch from dense to sparse recompiles only the blocks that
    have an indexer (one graph: both CSA layers share it), and a later step recompiles nothing."""
    ids = random_ids(random_model().args, 2, 65)
    results = []
    for compile_it in (False, True):
        model = random_model(seed=5, **FEW_SINKHORN).train()
        if compile_it:
            compile_blocks(model)
        counters.clear()
        graphs = []
        for stage in ("dense", "sparse", "sparse"):
            stats = TrainStats(indexer=stage, balance=True)
            loss, _ = training_loss(model, ids[:, :-1], ids[:, 1:], aux_alpha=1e-3, stats=stats,
                                    compiled=compile_it)
            loss.backward()
            graphs.append(counters["stats"]["unique_graphs"])
        if compile_it:
            assert not counters["graph_break"], dict(counters["graph_break"])
            assert graphs[0] > 0 and graphs[1] == graphs[0] + 1 and graphs[2] == graphs[1], graphs
        results.append({name: stats.collect(name) for name in ("load", "seq_balance", "indexer_kl")})
    eager, comp = results
    for name in eager:
        assert eager[name].keys() == comp[name].keys() and eager[name], name
        for layer, value in eager[name].items():
            torch.testing.assert_close(comp[name][layer].detach(), value.detach(), atol=1e-4, rtol=1e-4)
