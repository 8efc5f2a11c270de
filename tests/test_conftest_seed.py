"""The autouse seed fixture: a failing test's report names its seed, and FADE_TEST_SEED replays it."""
from pathlib import Path

CONFTEST = Path(__file__).with_name("conftest.py").read_text()


def test_a_failing_test_reports_its_seed_and_the_seed_replays(pytester, monkeypatch):
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(test_inner="""
        import torch

        def test_fails(_fresh_seed):
            print("drawn", torch.randint(0, 2**30, (1,)).item())
            assert False
    """)
    monkeypatch.setenv("FADE_TEST_SEED", "12345")
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider")
    result.assert_outcomes(failed=1)
    output = result.stdout.str()
    assert "torch seed 12345: rerun with FADE_TEST_SEED=12345" in output
    import torch

    torch.manual_seed(12345)
    assert f"drawn {torch.randint(0, 2**30, (1,)).item()}" in output


def test_a_passing_test_reports_nothing(pytester):
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(test_inner="def test_passes():\n    assert True\n")
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)
    assert "torch seed" not in result.stdout.str()
