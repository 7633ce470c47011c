"""
C{python -m twisted_lab ...} is the C{netlab} command.
"""

from twisted_lab.cli import main

main()
