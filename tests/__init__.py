"""The broker's tests."""

import pytest

# The shared helpers assert too (expect_refused, call, ...): rewrite their asserts as
# pytest does for test modules, so that a failure shows the values.
pytest.register_assert_rewrite("tests.helpers")
