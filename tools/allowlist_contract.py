"""An import-linter contract that lists what a package MAY import of its root package, not what it may not.

    [[tool.importlinter.contracts]]
    type = "allowlist"
    source_modules = ["ddpm.export"]
    allowed_modules = ["core", "ddpm.runtime.backends"]

Every import from a module in (or below) a source package into the root package must land in the source package
itself, in an allowed module or below it, or, for the entry ``core``, in a plain module directly in the root
package (``ddpm.schedule``, ``ddpm.loop``, ...: the project's core layer, docs/design.md "Layers") or the root
package itself (``ddpm.__version__``). A new
sibling package is therefore refused until the contract names it. Imports under ``if TYPE_CHECKING`` count too.
"""

from __future__ import annotations

from grimp import ImportGraph
from importlinter.application import output
from importlinter.domain import fields
from importlinter.domain.contract import Contract, ContractCheck

CORE = "core"


class AllowlistContract(Contract):
    """source_modules may import, of their root package, only allowed_modules (and ``core``)."""

    type_name = "allowlist"

    source_modules = fields.ListField(subfield=fields.StringField())
    allowed_modules = fields.ListField(subfield=fields.StringField())

    def check(self, graph: ImportGraph, verbose: bool) -> ContractCheck:
        root = next(iter(self.session_options["root_packages"]))
        packages = {m for m in graph.modules if graph.find_children(m)}
        allowed = [m for m in self.allowed_modules if m != CORE]
        core = CORE in self.allowed_modules
        bad: list[dict[str, object]] = []
        for source in self.source_modules:
            mine = {source, *graph.find_descendants(source)}
            for importer in sorted(mine):
                for imported in sorted(graph.find_modules_directly_imported_by(importer)):
                    if imported != root and not imported.startswith(root + "."):
                        continue  # third-party: not this contract's business
                    if imported in mine or any(
                        imported == a or imported.startswith(a + ".") for a in allowed
                    ):
                        continue
                    if core and (imported == root or (imported.count(".") == 1 and imported not in packages)):
                        continue
                    lines = graph.get_import_details(importer=importer, imported=imported)
                    bad.append(
                        {
                            "importer": importer,
                            "imported": imported,
                            "line": lines[0]["line_number"] if lines else "?",
                        }
                    )
        return ContractCheck(kept=not bad, metadata={"bad": bad})

    def render_broken_contract(self, check: ContractCheck) -> None:
        allowed = ", ".join(self.allowed_modules)
        for b in check.metadata["bad"]:
            output.print_error(
                f"{b['importer']} imports {b['imported']} (line {b['line']}); allowed: {allowed}", bold=False
            )
            output.new_line()
