"""Results of a study: the comparison table (``compare``) and the HTML / Markdown report (``report``)."""
