"""
Storage adapters: the stores behind the interfaces of L{twisted_lab.ports}.

C{sqlite} is the embedded default (a file, through adbapi), C{memory} is
for fast unit tests; each engine has its own migrations.
"""
