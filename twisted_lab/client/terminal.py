"""
The chat client's terminal user interface, on prompt_toolkit.

prompt_toolkit gives the input line its editing (Emacs keys, Unicode-width
aware), input history (Up/Down, Ctrl-R), Tab completion of commands, rooms
and names, and, inside L{patch_stdout}, prints what arrives above the input
line instead of through it.  It runs on asyncio, so the command installs
Twisted's asyncio reactor before anything else touches the reactor; the
chat session itself (L{twisted_lab.client.chat.ChatSession}) does not know
which front end it has.  Why prompt_toolkit rather than
C{twisted.conch.recvline} is explained in C{docs/guide.md}.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any

from prompt_toolkit import PromptSession
from prompt_toolkit.completion import CompleteEvent, Completer, Completion
from prompt_toolkit.document import Document
from prompt_toolkit.formatted_text import FormattedText
from prompt_toolkit.history import InMemoryHistory
from prompt_toolkit.patch_stdout import patch_stdout
from prompt_toolkit.styles import Style
from twisted.internet import defer
from twisted.python.failure import Failure

from twisted_lab.client.chat import ALIASES, COMMANDS, ChatSession, View

EXIT_INTERRUPTED = 130

STYLE = Style.from_dict(
    {"room": "ansicyan bold", "state": "ansiyellow", "arrow": "", "": ""}
)
ROOM_COMMANDS = {"/join", "/part", "/who", "/history"}


class TerminalView(View):
    """
    The session's lines, printed above the prompt (through the patched
    standard output), in colour unless C{NO_COLOR} is set.
    """

    def __init__(self, colour: bool = True) -> None:
        super().__init__(json=False, colour=colour)
        self.prompt: PromptSession[str] | None = None

    def changed(self) -> None:
        if self.prompt is not None and self.prompt.app.is_running:
            self.prompt.app.invalidate()

    def write(self, line: str, aside: bool = False) -> None:
        # Everything goes above the prompt, asides included.
        super().write(line, aside=False)
        self.changed()


class ChatCompleter(Completer):
    """
    Tab completion: commands at the start of the line, rooms after the
    room commands, names after C{/msg} and anywhere in a line.
    """

    def __init__(self, session: ChatSession) -> None:
        self.session = session

    def get_completions(
        self, document: Document, complete_event: CompleteEvent
    ) -> Iterable[Completion]:
        text = document.text_before_cursor
        words = text.split(" ")
        word = words[-1]
        if len(words) == 1 and word.startswith("/"):
            for command in sorted(set(COMMANDS) | set(ALIASES)):
                if command.startswith(word.lower()):
                    yield Completion(command + " ", -len(word), display=command)
            return
        command = ALIASES.get(words[0].lower(), words[0].lower())
        if len(words) == 2 and command in ROOM_COMMANDS:
            rooms = set(self.session.rooms) | self.session.knownRooms
            bare = word.lstrip("#")
            for room in sorted(rooms):
                if room.startswith(bare):
                    yield Completion(room, -len(word))
            return
        if word:
            for name in sorted(self.session.names):
                if name.startswith(word.lower()) and name != word:
                    suffix = ": " if len(words) == 1 else " "
                    if command == "/msg":
                        suffix = " "
                    yield Completion(name + suffix, -len(word), display=name)


def promptText(session: ChatSession) -> FormattedText:
    """
    The prompt: the room lines go to, and the connection's state.
    """
    parts: list[tuple[str, str]] = [
        ("class:room", f"#{session.current}" if session.current else "(no room)")
    ]
    if session.client is None or not session.isLive:
        parts.append(("class:state", " (reconnecting)"))
    if session.pending:
        parts.append(("class:state", f" ({session.pending} queued)"))
    parts.append(("class:arrow", "> "))
    return FormattedText(parts)


async def runTerminal(session: ChatSession, view: TerminalView) -> int:
    """
    Read lines from the terminal until C{/quit}, Ctrl-D or the end of the
    session; Ctrl-C exits with 130, quietly.
    """
    prompt: PromptSession[str] = PromptSession(
        history=InMemoryHistory(),
        completer=ChatCompleter(session),
        complete_while_typing=False,
        style=STYLE,
        enable_history_search=False,
    )
    view.prompt = prompt
    session.onChange = view.changed
    outcome: list[Any] = []

    def ended(result: Any) -> Any:
        outcome.append(result)
        if prompt.app.is_running:
            prompt.app.exit(exception=EOFError())
        return None

    session.done.addBoth(ended)

    async def ask() -> str | None:
        # KeyboardInterrupt must be caught in this coroutine: escaping an
        # asyncio task, it would stop the event loop (and the reactor).
        try:
            return await prompt.prompt_async(lambda: promptText(session))
        except KeyboardInterrupt:
            return None

    with patch_stdout(raw=True):
        while not outcome:
            future = asyncio.ensure_future(ask())
            try:
                line = await defer.Deferred.fromFuture(future)
            except EOFError:
                if not outcome:
                    session.finish()
                break
            if line is None:
                session.closing = True
                return EXIT_INTERRUPTED
            session.typed(line)
    while not outcome:  # pragma: no cover - finish() fires done at once
        await defer.succeed(None)
    result = outcome[0]
    if isinstance(result, Failure):
        result.raiseException()
    return int(result)
