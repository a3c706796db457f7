"""`python -m broker.loadtest` is `broker loadtest`."""

from __future__ import annotations

import sys

from broker.loadtest.command import main

sys.exit(main())
