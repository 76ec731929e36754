"""Smoke test for benchmarks/transformers_suite.py: no transformers test sources needed.

Checks the generated sources compile, the generated wrapper really applies mmskip to the model classes a
test class uses (and leaves unsupported ones alone), and the report reads junit XML and classifies
regressions into inherent differences and breakage.
"""

from __future__ import annotations

import importlib.util
import unittest

import pytest


@pytest.fixture
def suite(load_bench):
    return load_bench("transformers_suite")


def test_generated_sources_compile(suite):
    compile(suite.support_source(), "_mmskip_support.py", "exec")
    src = suite.variant_source("LlamaModelTest", "test_modeling_llama", 2, list(suite.VARIANTS))
    compile(src, "test_mmskip_variants_llama.py", "exec")
    assert "from ..._mmskip_support import variant" in src
    for v in suite.VARIANTS:
        assert f'LlamaModelTest_{v} = variant(_parent_module.LlamaModelTest, "{v}"' in src


def test_variant_applies_to_every_supported_model_class(suite, tmp_path, monkeypatch):
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification, LlamaModel

    (tmp_path / "_mmskip_support.py").write_text(suite.support_source())
    spec = importlib.util.spec_from_file_location("_mmskip_support_smoke", tmp_path / "_mmskip_support.py")
    support = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(support)

    class Tester:
        base_model_class = LlamaModel
        causal_lm_class = LlamaForCausalLM
        sequence_classification_class = LlamaForSequenceClassification

    class ParentTest(unittest.TestCase):
        model_tester_class = Tester
        all_model_classes = (LlamaModel, LlamaForCausalLM, LlamaForSequenceClassification)
        _torch_compile_train_cls = LlamaForCausalLM

        def setUp(self):
            self.built = []

        def test_build(self):
            config = LlamaConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                 num_key_value_heads=2, intermediate_size=16)  # fmt: skip
            for cls in self.all_model_classes:
                self.built.append(cls(config))

    log = tmp_path / "models.tsv"
    monkeypatch.setenv("MMSKIP_SUITE_LOG", str(log))
    cls = support.variant(ParentTest, "layer_skip_decode", "ParentTest_layer_skip_decode", __name__)
    assert cls.__name__ == "ParentTest_layer_skip_decode" and issubclass(cls, ParentTest)
    wrapped = cls.all_model_classes
    assert [c.__name__ for c in wrapped] == ["LlamaModel", "LlamaForCausalLM", "LlamaForSequenceClassification"]
    assert all(w is not o and issubclass(w, o) for w, o in zip(wrapped, ParentTest.all_model_classes))
    assert cls._torch_compile_train_cls is wrapped[1]  # one wrapper per class
    assert cls.model_tester_class.causal_lm_class is wrapped[1]
    assert cls.model_tester_class.__name__ == "Tester"
    assert "GenerationMixin" in str(wrapped[1].__bases__)  # transformers' test_inherits_generation_mixin
    assert ParentTest.all_model_classes[1] is LlamaForCausalLM  # the parent is untouched

    result = unittest.TestResult()
    cls("test_build").run(result)
    assert result.wasSuccessful(), result.errors + result.failures
    rows = [line.split("\t") for line in log.read_text().splitlines()]
    assert [(r[1], r[2]) for r in rows] == [
        ("LlamaModel", "applied"),
        ("LlamaForCausalLM", "applied"),
        ("LlamaForSequenceClassification", "unsupported"),
    ]
    assert rows[0][0].endswith("ParentTest_layer_skip_decode.test_build")
    assert support.HANDLES == []  # cleared after the test

    # a class without an LM head that the technique refuses stays unmodified; a causal LM gets it
    log.unlink()
    swift = support.variant(ParentTest, "swift", "ParentTest_swift", __name__)
    result = unittest.TestResult()
    swift("test_build").run(result)
    assert result.wasSuccessful(), result.errors + result.failures
    status = {r[1]: r[2] for r in (line.split("\t") for line in log.read_text().splitlines())}
    assert status["LlamaForCausalLM"] == "applied"
    assert status["LlamaModel"] == "unsupported" or status["LlamaModel"].startswith("refused"), status


JUNIT = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest">
<testcase classname="t.C" name="test_grad"><failure message="AssertionError: no gradient">E x</failure></testcase>
<testcase classname="t.C" name="test_cache"><failure message="AssertionError:">E   RuntimeError: bad cache
E   more</failure></testcase>
<testcase classname="t.C" name="test_sub"/>
<testcase classname="t.C" name="test_sub"><failure message="subtest broke">E y</failure></testcase>
<testcase classname="t.C" name="test_fixed"/>
<testcase classname="t.C" name="test_same"><skipped message="needs a GPU"/></testcase>
</testsuite></testsuites>"""

PARENT = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest">
<testcase classname="t.P" name="test_grad"/><testcase classname="t.P" name="test_cache"/>
<testcase classname="t.P" name="test_sub"/>
<testcase classname="t.P" name="test_fixed"><error message="boom on the parent">E z</error></testcase>
<testcase classname="t.P" name="test_same"><skipped message="needs a GPU"/></testcase>
</testsuite></testsuites>"""


def test_report_classifies_inherent_and_breakage(suite, tmp_path, monkeypatch):
    (tmp_path / "v.xml").write_text(JUNIT)
    (tmp_path / "p.xml").write_text(PARENT)
    variant, parent = suite.read_junit(tmp_path / "v.xml"), suite.read_junit(tmp_path / "p.xml")
    assert variant["test_sub"]["outcome"] == "failed"  # a failing subtest entry wins over the passing one
    assert variant["test_cache"]["message"] == "RuntimeError: bad cache more"  # bare "AssertionError:" -> E lines
    assert suite.counts(variant) == {"passed": 1, "failed": 3, "skipped": 1, "total": 5}

    monkeypatch.setattr(suite, "INHERENT", {r"^layer_skip_all::test_grad$": "a skipped layer gets no gradient"})
    cmp = suite.classify(parent, "layer_skip_all", variant)
    assert [e["test"] for e in cmp["inherent"]] == ["test_grad"]
    assert cmp["inherent"][0]["reason"] == "a skipped layer gets no gradient"
    assert [e["test"] for e in cmp["breakage"]] == ["test_cache", "test_sub"]
    assert cmp["fixed_vs_parent"] == ["test_fixed"]
    # the pattern names one variant: on another, the same failure is breakage
    other = suite.classify(parent, "ffn_skip", variant)
    assert [e["test"] for e in other["breakage"]] == ["test_cache", "test_grad", "test_sub"]

    run = {"counts": suite.counts(variant), "compare": cmp, "seconds": 1.0, "mmskip_sources": ["a", "b"],
           "built": {"models": {"applied": 2}, "tests_applied": 2, "tests_skipping": 1}}  # fmt: skip
    parent_run = {"counts": suite.counts(parent), "seconds": 1.0, "built": {"models": {}}, "mmskip_sources": ["a"]}
    meta = {"transformers": "x", "torch": "y", "cpu_count": 2, "timeout": 1, "workers": 1, "k": "", "seconds": 2.0,
            "mmskip_commit": "abc", "source": "/s", "variants": ["layer_skip_all"], "preflight": {}}  # fmt: skip
    md = suite.markdown({"meta": meta, "suites": {"llama": {"runs": {"parent": parent_run, "layer_skip_all": run}}}})
    assert "| llama | layer_skip_all | 1 | 3 | 1 | 1 | **2** | 2 / 0 / 0 (2; 1) | 1 s (**mmskip changed" in md
    breakage, inherent = md.split("## Inherent differences")
    assert "RuntimeError: bad cache more" in breakage and "test_grad" not in breakage
    assert "a skipped layer gets no gradient" in inherent and "`test_grad`" in inherent
