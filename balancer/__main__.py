"""`python -m balancer` is the same as the `balancer` command."""

from balancer.cli import main

raise SystemExit(main())
