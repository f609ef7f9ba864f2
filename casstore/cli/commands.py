"""Every command, registered on the app in the order help lists them."""

from __future__ import annotations

from casstore.cli import doctor, explain_cmd, gc_cmds, keygen, store_cmds, vllm_cmds
from casstore.cli.common import app, main

app.command()(store_cmds.save)
app.command()(store_cmds.load)
app.command("ls")(store_cmds.list_keys)
app.command()(store_cmds.show)
app.command()(store_cmds.verify)
app.command()(store_cmds.stats)
app.command()(store_cmds.du)
app.command()(gc_cmds.rm)
app.command()(gc_cmds.gc)
app.command()(doctor.doctor)
app.command("explain")(explain_cmd.explain_cmd)
app.command()(keygen.keygen)
app.add_typer(vllm_cmds.app, name="vllm")

__all__ = ["app", "main"]
