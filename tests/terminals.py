"""Driving a command in a terminal, as a user sees it: `Tmux` (a private tmux server
showing one pane) or `Pexpect` (a pty). `screen()` is what a test searches: tmux's pane,
or pexpect's output stream with escape sequences removed (everything ever written).
`view()` is what is on the screen now, after every cursor move and erase: tmux's pane, or
pexpect's stream played on `Screen`, a small terminal emulator that knows what rich's
live displays send (carriage return, newline, cursor up and down, erase in line, line
wrap at the width). `keys(text)` types without Enter. `wait(term, pred, what)` polls."""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


class Tmux:
    """A private tmux server (its own socket) showing one pane: what the user sees."""

    def __init__(self, tmp: Path, cmd: list, env: dict, size=(160, 60)):
        self.sock = str(tmp / "tmux.sock")
        base = ["tmux", "-S", self.sock, "-f", "/dev/null"]
        self.base = base
        subprocess.run(
            base + ["new-session", "-d", "-s", "t", "-x", str(size[0]), "-y", str(size[1]),
                    " ".join(quote(c) for c in cmd), ";", "set-option", "-t", "t", "remain-on-exit", "on"],
            env=env, check=True,
        )

    def screen(self) -> str:
        r = subprocess.run(self.base + ["capture-pane", "-p", "-J", "-t", "t", "-S", "-2000"],
                           capture_output=True, text=True)
        return r.stdout

    def view(self) -> str:
        return self.screen()

    def keys(self, text: str) -> None:
        subprocess.run(self.base + ["send-keys", "-t", "t", "-l", text], check=True)

    def type(self, text: str) -> None:
        self.keys(text)
        subprocess.run(self.base + ["send-keys", "-t", "t", "Enter"], check=True)

    def key(self, key: str) -> None:
        subprocess.run(self.base + ["send-keys", "-t", "t", key], check=True)

    def dead(self) -> bool:
        r = subprocess.run(self.base + ["display-message", "-p", "-t", "t", "#{pane_dead}"],
                           capture_output=True, text=True)
        return r.stdout.strip() == "1"

    def close(self) -> None:
        subprocess.run(self.base + ["kill-server"], capture_output=True)


class Pexpect:
    """Fallback where tmux is missing: a pexpect pty; the "screen" is the output stream
    with escape sequences removed."""

    def __init__(self, tmp: Path, cmd: list, env: dict, size=(160, 60)):
        import pexpect

        self.p = pexpect.spawn(cmd[0], cmd[1:], env=env, dimensions=(size[1], size[0]),
                               encoding="utf-8", codec_errors="replace", cwd=str(REPO))
        self.buf = ""
        self.width = size[0]

    def screen(self) -> str:
        import pexpect

        try:
            while True:
                self.buf += self.p.read_nonblocking(65536, timeout=0.05)
        except (pexpect.TIMEOUT, pexpect.EOF):
            pass
        return re.sub(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b[()][A-Z0-9]|\r", "", self.buf)

    def view(self) -> str:
        self.screen()
        return Screen(self.width).play(self.buf)

    def keys(self, text: str) -> None:
        self.p.send(text)

    def type(self, text: str) -> None:
        self.p.sendline(text)

    def key(self, key: str) -> None:
        {"C-c": self.p.sendintr, "C-d": self.p.sendeof}[key]()

    def dead(self) -> bool:
        self.screen()
        return not self.p.isalive()

    def close(self) -> None:
        if self.p.isalive():
            self.p.terminate(force=True)


def quote(s: str) -> str:
    import shlex

    return shlex.quote(s)


def wait(term, pred, what: str, timeout: float = 30.0) -> str:
    end = time.time() + timeout
    while time.time() < end:
        screen = term.screen()
        if pred(screen):
            return screen
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}; screen:\n{term.screen()[-3000:]}")


class Screen:
    """A terminal of `width` columns and unlimited height, enough for what rich's Live
    and a REPL write: printable characters (wrapping at the width, as xterm does: the
    wrap happens when the next character comes), CR, LF, backspace, tab, and the CSI
    sequences for cursor up/down/forward/back/column and erase in line; the rest
    (colours, cursor shape, titles) changes nothing on screen."""

    CSI = re.compile(r"\x1b\[([0-9;?]*)([A-Za-z@])|\x1b\][^\x07]*\x07|\x1b[()][A-Z0-9]|\x1b[=>]")

    def __init__(self, width: int):
        self.width = width
        self.lines = [[]]
        self.wrapped = set()  # rows that continue the row above (a wrapped line)
        self.row = self.col = 0

    def play(self, data: str) -> str:
        pos = 0
        for m in self.CSI.finditer(data):
            self._text(data[pos:m.start()])
            if m.group(2):
                self._csi(m.group(1), m.group(2))
            pos = m.end()
        self._text(data[pos:])
        # Wrapped rows joined back into their line, as `tmux capture-pane -J` does.
        out = []
        for row, line in enumerate(self.lines):
            text = "".join(line)
            if row in self.wrapped and out:
                out[-1] += text
            else:
                out.append(text)
        return "\n".join(line.rstrip() for line in out).rstrip("\n") + "\n"

    def _line(self) -> list:
        while len(self.lines) <= self.row:
            self.lines.append([])
        line = self.lines[self.row]
        if len(line) < self.col:
            line.extend(" " * (self.col - len(line)))
        return line

    def _text(self, text: str) -> None:
        for ch in text:
            if ch == "\r":
                self.col = 0
            elif ch == "\n":
                self.row += 1
                self.wrapped.discard(self.row)
            elif ch == "\b":
                self.col = max(0, self.col - 1)
            elif ch == "\t":
                self.col = min(self.width - 1, (self.col // 8 + 1) * 8)
            elif ch >= " ":
                if self.col >= self.width:  # the deferred wrap
                    self.row, self.col = self.row + 1, 0
                    self.wrapped.add(self.row)
                line = self._line()
                if self.col < len(line):
                    line[self.col] = ch
                else:
                    line.append(ch)
                self.col += 1

    def _csi(self, params: str, final: str) -> None:
        n = int(params.split(";")[0]) if params[:1].isdigit() else None
        if final == "A":
            self.row = max(0, self.row - (n or 1))
        elif final == "B":
            self.row += n or 1
        elif final == "C":
            self.col = min(self.width - 1, self.col + (n or 1))
        elif final == "D":
            self.col = max(0, min(self.col, self.width - 1) - (n or 1))
        elif final == "G":
            self.col = (n or 1) - 1
        elif final == "K":
            line = self._line()
            col = min(self.col, self.width)
            if n in (None, 0):
                del line[col:]
            elif n == 1:
                line[: col + 1] = " " * min(col + 1, len(line))
            else:
                line.clear()
                self.wrapped.discard(self.row)
