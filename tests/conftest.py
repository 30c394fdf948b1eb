def pytest_configure(config):
    config.addinivalue_line("markers", "browser: drives a headless Chromium (slow; deselect with -m 'not browser')")
