"""gateway.config and the ``gateway`` command line (run as a real subprocess)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

import gateway
from gateway.config import ConfigError, load_settings
from gateway.plugins import PluginLoadError, describe, make_manager
from tests.conftest import REPO

CONFIG = REPO / "gateway.toml"


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    """No GATEWAY_* variable of the outer environment leaks into a test."""
    for name in list(os.environ):
        if name.startswith("GATEWAY_"):
            monkeypatch.delenv(name)


# -- load_settings --------------------------------------------------------------------------------

def test_the_repository_config_loads():
    s = load_settings(CONFIG)
    assert "waha" in s.providers
    assert s.providers["waha"]["base_url"] == "http://localhost:3000"
    assert s.storage.backend == "local"
    assert s.section("storage", "local")["root"] == "var/media"
    assert s.resolve_path(s.section("storage", "local")["root"]) == REPO / "var" / "media"
    assert s.catalog.path == REPO / "var" / "gateway.db"  # relative to the file, not the cwd
    assert s.server.port == 8080 and s.queue.workers == 16 and s.queue.fetch_workers == 32


def test_relative_paths_do_not_depend_on_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert load_settings(CONFIG).catalog.path == REPO / "var" / "gateway.db"


def test_env_overrides_the_port(monkeypatch):
    monkeypatch.setenv("GATEWAY_SERVER__PORT", "9000")
    s = load_settings(CONFIG)
    assert s.server.port == 9000
    assert s.server.host == "127.0.0.1"  # the rest of [server] still comes from the file


def test_env_overrides_a_nested_provider_setting(monkeypatch):
    monkeypatch.setenv("GATEWAY_PROVIDERS__WAHA__API_KEY", "from-env")
    s = load_settings(CONFIG)
    assert s.providers["waha"]["api_key"] == "from-env"
    assert s.providers["waha"]["base_url"] == "http://localhost:3000"  # merged, not replaced
    assert s.section("providers", "waha")["enabled"] is True


def test_a_bad_env_override_names_the_setting(monkeypatch):
    monkeypatch.setenv("GATEWAY_SERVER__PORT", "70000")
    with pytest.raises(ConfigError) as info:
        load_settings(CONFIG)
    assert str(info.value).startswith("server.port")


def _toml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "gateway.toml"
    path.write_text(text)
    return path


def test_env_references_are_expanded(tmp_path, monkeypatch):
    monkeypatch.setenv("TEST_LINK_SECRET", "s3cr3t")
    monkeypatch.setenv("TEST_WAHA_HOST", "waha.internal")
    path = _toml(tmp_path, '[media]\nlink_secret = "${TEST_LINK_SECRET}"\n'
                           '[providers.waha]\nbase_url = "http://${TEST_WAHA_HOST}:3000"\n')
    s = load_settings(path)
    assert s.media.link_secret.get_secret_value() == "s3cr3t"
    assert s.link_secret() == b"s3cr3t"
    assert s.providers["waha"]["base_url"] == "http://waha.internal:3000"


@pytest.mark.parametrize("text,setting", [
    ('[media]\nlink_secret = "${TEST_SURELY_UNSET_VAR}"\n', "media.link_secret"),
    ('[providers.waha]\napi_key = "key-${TEST_SURELY_UNSET_VAR}"\n', "providers.waha.api_key"),
])
def test_an_unset_env_reference_names_the_setting(tmp_path, monkeypatch, text, setting):
    monkeypatch.delenv("TEST_SURELY_UNSET_VAR", raising=False)
    with pytest.raises(ConfigError) as info:
        load_settings(_toml(tmp_path, text))
    msg = str(info.value)
    assert msg.startswith(setting + ":"), msg
    assert "TEST_SURELY_UNSET_VAR" in msg
    assert "\n" not in msg


def test_a_plugin_section_error_names_the_full_setting():
    from gateway.app import select_providers

    s = load_settings(CONFIG)
    s.providers["waha"]["base_url"] = "not a url"
    with pytest.raises(ConfigError) as info:
        select_providers(s, make_manager())
    assert str(info.value).startswith("providers.waha.base_url:")


def test_a_toml_syntax_error_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_settings(_toml(tmp_path, "[server\nport = 1\n"))
    assert str(info.value).startswith("config:") and "\n" not in str(info.value)


def test_a_missing_config_file(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_settings(tmp_path / "nope.toml")
    assert str(info.value).startswith("config")


# -- the CLI --------------------------------------------------------------------------------------
# Every command runs as its own ``python -m gateway`` process. They are independent, so the module
# starts them all at once (one interpreter start-up each is the slow part) and each test checks
# the outcome of its own.

BAD_CONFIGS = {
    "server.port": "[server]\nport = 70000\n",
    "server.hots": '[server]\nport = 8080\nhots = "0.0.0.0"\n',
    "media.key_template": '[media]\nkey_template = "{provider}/{account}/{category}{ext}"\n',
    "queue.workers": "[queue]\nworkers = 0\n",
    "storage.backend": '[storage]\nbackend = "nope"\n',
    "catalog.url": '[catalog]\nurl = "mysql://gw@db/gateway"\n',
    "queue.lease": "[queue]\nlease = 0.5\n",
    "media.link_secret": '[catalog]\nurl = "postgresql://gw:pw@db/gateway"\n',  # replicas need one key
}
SERVE_BAD = ["server.port", "storage.backend"]  # in load_settings; later, in create_app


def _broken_distribution(root: Path) -> None:
    info = root / "broken_plugin-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[gateway]\nbroken = broken_mod\n")
    (root / "broken_mod.py").write_text('raise ImportError("boom")\n')


def _misspelt_distribution(root: Path) -> None:
    info = root / "misspelt_plugin-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: misspelt-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[gateway]\nmisspelt = misspelt_mod\n")
    (root / "misspelt_mod.py").write_text(
        "import gateway\n\n@gateway.hookimpl\ndef register_storag(settings):\n    return None\n")


# typos a newcomer makes: each is refused, naming the closest valid name
TYPOS = ('[storage]\nservng = "proxy"\n[storage.lcoal]\nroot = "var/media"\n'
         '[providers.whatsapp]\nenabled = true\n[providers.waha]\nbse_url = "http://localhost:3000"\n')
TYPO_LINES = [
    "gateway: config error: storage.servng: unknown setting; did you mean storage.serving?",
    "gateway: config error: storage.lcoal: unknown section (no installed plugin owns it); "
    "did you mean storage.local?",
    "gateway: config error: providers.whatsapp: unknown section (no installed plugin owns it); "
    "did you mean providers.waha?",
    "gateway: config error: providers.waha.bse_url: unknown setting; did you mean providers.waha.base_url?",
]
MANY_ERRORS = ('[server]\nprot = 1\n[retention]\nmax_age_days = -1\n[log]\nlevel = "debug"\n'
               '[[targets]]\nname = "a b"\nurl = "http://127.0.0.1:9/hook"\n'
               '[[api.keys]]\nname = "k"\nkey = "${TEST_SURELY_UNSET_BOT_KEY}"\n')
MANY_LINES = [
    "gateway: config error: server.prot: unknown setting; did you mean server.port?",
    'gateway: config error: retention.max_age_days: must be a number of days above 0 or "forever", got -1',
    "gateway: config error: targets[0].name: String should match pattern '^[A-Za-z0-9_.-]{1,64}$'",
    "gateway: config error: api.keys[0].key: environment variable TEST_SURELY_UNSET_BOT_KEY is not set",
]
BOT_KEY_CONFIG = ('[catalog]\npath = "var/gateway.db"\n[storage.local]\nroot = "var/media"\n'
                  '[[api.keys]]\nname = "bot"\nkey = "${TEST_SURELY_UNSET_BOT_KEY}"\nscopes = ["write"]\n')


class CliRun:
    def __init__(self, args: list[str], cwd: Path, env: dict[str, str] | None = None):
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
        full_env.update(env or {})
        self.cwd = cwd
        self.proc = subprocess.Popen([sys.executable, "-m", "gateway", *args], cwd=cwd, env=full_env,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.returncode: int | None = None
        self.stdout = self.stderr = ""

    def wait(self, timeout: float) -> CliRun:
        try:
            self.stdout, self.stderr = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.stdout, self.stderr = self.proc.communicate()
        self.returncode = self.proc.returncode
        return self


@pytest.fixture(scope="module")
def cli(tmp_path_factory) -> dict[str, CliRun]:
    base = tmp_path_factory.mktemp("cli")

    def workdir(name: str, toml: str | None = None) -> Path:
        d = base / name.replace("/", "_")
        d.mkdir()
        if toml is not None:
            (d / "gateway.toml").write_text(toml)
        return d

    runs: dict[str, CliRun] = {}
    d = workdir("ok")
    runs["ok"] = CliRun(["check-config", "--config", str(CONFIG)], d)
    for setting, text in BAD_CONFIGS.items():
        d = workdir(f"bad-{setting}", text)
        runs[f"bad:{setting}"] = CliRun(["check-config", "--config", str(d / "gateway.toml")], d)
    for setting in SERVE_BAD:
        d = workdir(f"serve-{setting}", BAD_CONFIGS[setting] + '[catalog]\npath = "var/gateway.db"\n')
        runs[f"serve:{setting}"] = CliRun(["serve", "--config", str(d / "gateway.toml")], d)
    d = workdir("typos", TYPOS)
    runs["typos"] = CliRun(["check-config", "--config", str(d / "gateway.toml")], d)
    d = workdir("typos-serve", TYPOS + '[catalog]\npath = "var/gateway.db"\n')
    runs["typos-serve"] = CliRun(["serve", "--config", str(d / "gateway.toml")], d)
    d = workdir("many", MANY_ERRORS)
    runs["many"] = CliRun(["check-config", "--config", str(d / "gateway.toml")], d)
    d = workdir("bot-key", BOT_KEY_CONFIG)
    runs["cleanup-bot-key"] = CliRun(["cleanup", "--dry-run", "--config", str(d / "gateway.toml")], d)
    d = workdir("bot-key-serve", BOT_KEY_CONFIG)
    runs["serve-bot-key"] = CliRun(["serve", "--config", str(d / "gateway.toml")], d)
    d = workdir("plugins")
    runs["plugins"] = CliRun(["plugins"], d)
    site = base / "misspelt-site"
    _misspelt_distribution(site)
    d = workdir("misspelt")
    runs["misspelt"] = CliRun(["plugins"], d, env={"PYTHONPATH": str(site)})
    site = base / "broken-site"
    _broken_distribution(site)
    d = workdir("broken")
    runs["broken"] = CliRun(["plugins"], d, env={"PYTHONPATH": str(site)})
    deadline = time.monotonic() + 90  # about 20 interpreters start at once: slow on a busy machine
    for run in runs.values():
        run.wait(timeout=max(0.1, deadline - time.monotonic()))
    return runs


def test_check_config_of_the_repository_config(cli):
    r = cli["ok"]
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("ok: storage local, providers waha")


@pytest.mark.parametrize("setting", sorted(BAD_CONFIGS))
def test_check_config_bad_values_exit_2_with_one_line(cli, setting):
    r = cli[f"bad:{setting}"]
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert f" {setting}: " in lines[0], lines[0]
    assert r.stdout == ""


@pytest.mark.parametrize("setting", SERVE_BAD)
def test_serve_with_a_bad_config_exits_2_quickly(cli, setting):
    r = cli[f"serve:{setting}"]
    assert r.returncode == 2, (r.stdout, r.stderr)  # a hung daemon was killed: -9
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and f" {setting}: " in lines[0], r.stderr
    assert not (r.cwd / "var").exists()  # nothing was opened


def test_plugins_lists_the_builtin_plugins_and_their_hooks(cli):
    r = cli["plugins"]
    assert r.returncode == 0, r.stderr
    rows = {line.split()[0]: line.split() for line in r.stdout.splitlines() if line.strip()}
    assert rows["whatsapp_waha"][1] == "plugins.whatsapp_waha"
    assert rows["whatsapp_waha"][-2:] == ["register_providers,", "settings_sections"]
    assert rows["storage_local"][1] == "plugins.storage_local"
    assert rows["storage_local"][-2:] == ["register_storage,", "settings_sections"]
    assert "chat-media-gateway" in rows["storage_local"]


def test_a_plugin_that_fails_to_import_is_named(cli):
    r = cli["broken"]
    assert r.returncode != 0
    assert r.returncode == 1, r.stderr  # a plugin error, not a config error
    assert "broken" in r.stderr and "boom" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_typos_in_settings_and_sections_are_refused_with_the_closest_name(cli):
    for run in (cli["typos"], cli["typos-serve"]):
        assert run.returncode == 2, (run.stdout, run.stderr)
        assert run.stderr.strip().splitlines() == TYPO_LINES
    assert not (cli["typos-serve"].cwd / "var").exists()


def test_every_problem_is_shown_in_one_path_style_without_pydantic_internals(cli):
    r = cli["many"]
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines() == MANY_LINES  # log level "debug" is fine in any case


def test_cleanup_does_not_need_the_secrets_of_the_api(cli):
    r = cli["cleanup-bot-key"]
    assert r.returncode == 0, r.stderr
    assert "dry run: nothing was changed" in r.stdout
    r = cli["serve-bot-key"]  # the daemon uses the key: refused
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        "gateway: config error: api.keys[0].key: environment variable TEST_SURELY_UNSET_BOT_KEY is not set"]


def test_a_misspelt_hook_names_the_entry_point_once(cli):
    r = cli["misspelt"]
    assert r.returncode == 1, r.stderr
    assert r.stderr.strip().splitlines() == [
        "gateway: plugin misspelt (misspelt_mod): unknown hook 'register_storag'; "
        "did you mean 'register_storage'?"]


def test_log_levels_in_any_case(tmp_path):
    assert load_settings(_toml(tmp_path, '[log]\nlevel = "warning"\n')).log.level == "WARNING"


def test_an_unknown_key_in_a_list_item_names_its_closest(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_settings(_toml(tmp_path, '[[targets]]\nname = "bot"\nurl = "http://127.0.0.1:9/"\nsecert = "x"\n'))
    assert str(info.value) == "targets[0].secert: unknown setting; did you mean targets[0].secret?"


# -- the plugin manager in process ----------------------------------------------------------------

class _Misspelt:
    @gateway.hookimpl
    def register_provider(self, settings):  # the hook is register_providers
        return []


class _Good:
    @gateway.hookimpl
    def register_providers(self, settings):
        return []


def test_a_misspelt_hook_fails_loudly():
    with pytest.raises(PluginLoadError) as info:
        make_manager(load_entrypoints=False, extra=[_Misspelt()])
    msg = str(info.value)
    assert msg == "plugin _Misspelt: unknown hook 'register_provider'; did you mean 'register_providers'?"


def test_a_correct_extra_plugin_registers():
    pm = make_manager(load_entrypoints=False, extra=[_Good()])
    [info] = describe(pm)
    assert info.hooks == ("register_providers",)
    assert info.module == __name__


def test_the_app_refuses_an_unexpanded_reference_however_the_settings_were_built(tmp_path, monkeypatch):
    from gateway.app import create_app
    from gateway.config import Settings

    monkeypatch.delenv("TEST_SURELY_UNSET_BOT_KEY", raising=False)
    settings = Settings(config_dir=tmp_path, api={"keys": [{"name": "bot", "key": "${TEST_SURELY_UNSET_BOT_KEY}"}]})
    assert settings.unset_env == {"api.keys[0].key": "TEST_SURELY_UNSET_BOT_KEY"}
    with pytest.raises(ConfigError) as info:
        create_app(settings)  # the literal "${...}" never becomes an accepted key
    assert str(info.value) == "api.keys[0].key: environment variable TEST_SURELY_UNSET_BOT_KEY is not set"


def test_a_postgresql_catalog_is_shown_without_its_password(tmp_path):
    from gateway.config import CatalogSettings
    settings = CatalogSettings(url="postgresql://gw:s3cret@db.internal:5433/gateway?sslmode=require")
    assert settings.describe() == "postgresql://gw@db.internal:5433/gateway"
    assert CatalogSettings(path=tmp_path / "g.db").describe() == str(tmp_path / "g.db")
