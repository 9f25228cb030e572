"""`python -m smtpd`: the smtpd command line."""

import sys

from smtpd.cli import main

sys.exit(main())
