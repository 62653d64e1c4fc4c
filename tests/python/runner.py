"""Runs every `test_*` function of a test module, printing one line each and an
"N passed, N failed" line at the end (what crates/serve/tests/openai_python.rs
looks for). The scripts also run under pytest, which ignores this."""

import traceback


def main(namespace):
    tests = [(name, f) for name, f in sorted(namespace.items()) if name.startswith("test_") and callable(f)]
    passed = failed = 0
    for name, f in tests:
        try:
            f()
        except Exception:
            failed += 1
            print(f"FAIL {name}")
            traceback.print_exc()
        else:
            passed += 1
            print(f"ok   {name}")
    print(f"{passed} passed, {failed} failed")
    return 1 if failed else 0
