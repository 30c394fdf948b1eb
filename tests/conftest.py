def pytest_configure(config):
    config.addinivalue_line("markers", "browser: drives a headless Chromium (slow; deselect with -m 'not browser')")
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU, skipped without one (bench.device_check runs them; "
                            "DIGIT_TEST_DEVICE=cpu runs them on the CPU)")
