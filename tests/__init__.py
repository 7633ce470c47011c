"""
netlab's test suite: runs under both C{python -m twisted.trial tests} and
C{python -m pytest}.
"""
