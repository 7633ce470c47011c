"""
C{python -m twisted_lab ...} is the C{netlab} command.
"""

from twisted_lab.client.cli import main

main()
