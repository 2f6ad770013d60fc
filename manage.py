#!/usr/bin/env python
import os
import sys

if __name__ == "__main__":
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "mistudio.settings")
    from django.core.management import execute_from_command_line

    from mistudio.supervise import exit_now

    try:
        execute_from_command_line(sys.argv)
    except SystemExit as exc:
        exit_now(exc.code)
    exit_now(0)
