"""kvrelay: the command line, launchers and deployment helpers."""

from kvrelay.parent import die_with_launcher

die_with_launcher()  # a no-op unless a launcher started this process
