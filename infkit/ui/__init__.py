"""The picture side of infkit: static HTML renderers (:mod:`infkit.ui.html`), matplotlib plots
(:mod:`infkit.ui.plots`) and the self-contained HTML report (:mod:`infkit.ui.report`). Nothing here computes
influence; it renders what the public API returns."""
