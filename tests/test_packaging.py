"""
Packaging: a non-editable install of the project into a fresh virtual
environment makes C{twistd} list every netlab plugin and provides the
C{netlab} command, and the wheel ships no C{dropin.cache}.
"""

from __future__ import annotations

import subprocess
import sys
import venv
import zipfile
from pathlib import Path

from twisted.internet import threads
from twisted.trial.unittest import TestCase

from tests.helpers import REPO

PLUGINS = ["netlab-echo", "netlab-identity", "netlab-auth", "netlab-chat"]


def run(*command: str | Path, cwd: Path) -> str:
    result = subprocess.run(
        [str(c) for c in command],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
        env={"PATH": "/usr/bin:/bin", "PIP_DISABLE_PIP_VERSION_CHECK": "1"},
    )
    if result.returncode != 0:
        raise AssertionError(
            f"{command} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
        )
    return result.stdout


class PackagingTests(TestCase):
    timeout = 600

    def test_freshInstallFindsPlugins(self):
        return threads.deferToThread(self._freshInstall)

    def _freshInstall(self) -> None:
        work = Path(self.mktemp()).absolute()
        work.mkdir(parents=True)
        wheels = work / "wheels"
        run(
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "-w",
            wheels,
            REPO,
            cwd=work,
        )
        [wheel] = wheels.glob("twisted_lab-*.whl")
        names = zipfile.ZipFile(wheel).namelist()
        self.assertIn("twisted/plugins/netlab_plugins.py", names)
        self.assertNotIn("twisted/plugins/__init__.py", names)
        self.assertNotIn("twisted/__init__.py", names)
        self.assertFalse([n for n in names if n.endswith("dropin.cache")])

        env = work / "venv"
        venv.EnvBuilder(with_pip=True).create(env)
        python = env / "bin" / "python"
        run(python, "-m", "pip", "install", "--quiet", wheel, cwd=work)
        # Run from a directory that has no source tree in it.
        helpText = run(env / "bin" / "twistd", "--help", cwd=work)
        for plugin in PLUGINS:
            self.assertIn(plugin, helpText)
        self.assertIn("netlab", run(env / "bin" / "netlab", "--help", cwd=work))
