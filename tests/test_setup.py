"""`drp setup` wipes only what an earlier setup made for the same site (a marker it writes in
the repository): never an unrelated folder a typo points at, another site's repository, or a
registry schema someone else made; --force says otherwise."""

from pathlib import Path

import pytest

from drp_flows.errors import InputError
from drp_flows.sites.butler import MARKER, check_wipeable, wipe_repo
from drp_flows.sites.config import load_sites


def test_an_unrelated_folder_is_never_wiped(tmp_path, one_site_file):
    precious = tmp_path / "thesis"
    precious.mkdir()
    (precious / "chapter1.tex").write_text("years of work")
    site = load_sites(one_site_file("mine", storage=f"file://{tmp_path}/store",
                                    butler=f"{{repo: {precious}}}"))["mine"]
    for wipe in (check_wipeable, wipe_repo):
        with pytest.raises(InputError, match=rf"site mine: directory {precious} exist\(s\), "
                                             rf"but {precious}/{MARKER} does not say") as err:
            wipe(site)
        assert "drp setup --force" in str(err.value)
    assert (precious / "chapter1.tex").read_text() == "years of work"
    wipe_repo(site, force=True)
    assert not precious.exists()


def test_another_sites_repository_is_not_wiped(solo_site, tmp_path, one_site_file):
    """A second site file whose site points at the solo site's storage: its setup is refused
    (the marker there names solo), the solo site's repository stays whole."""
    solo = load_sites(solo_site("marker"))["solo"]
    other = load_sites(one_site_file("other", storage=solo.storage))["other"]
    with pytest.raises(InputError, match=r"site other: directory .*/solo/repo exist"):
        check_wipeable(other)
    check_wipeable(solo)                        # its own setup may wipe it
    assert Path(solo.repo_dir, "butler.yaml").exists()


def test_a_schema_someone_else_made_is_not_dropped(postgres_url, tmp_path, one_site_file):
    import sqlalchemy

    db = postgres_url("drp_test")
    site = load_sites(one_site_file("pgother", storage=f"file://{tmp_path}/pg",
                                    butler=f'{{registry: "{db}"}}'))["pgother"]
    engine = sqlalchemy.create_engine(db)
    with engine.begin() as conn:
        conn.execute(sqlalchemy.text('DROP SCHEMA IF EXISTS "drp_pgother" CASCADE'))
        conn.execute(sqlalchemy.text('CREATE SCHEMA "drp_pgother"'))
        conn.execute(sqlalchemy.text('CREATE TABLE "drp_pgother".accounts (id int)'))
    with pytest.raises(InputError, match="site pgother: registry schema drp_pgother exist"):
        wipe_repo(site)
    with engine.connect() as conn:
        assert sqlalchemy.inspect(conn).has_schema("drp_pgother")
    wipe_repo(site, force=True)
    with engine.connect() as conn:
        assert not sqlalchemy.inspect(conn).has_schema("drp_pgother")
    engine.dispose()
