"""Reports: JSON + Markdown with config, versions and git sha."""

from fskd.reports.report import markdown_table, report_name, versions, write_report

__all__ = ["markdown_table", "report_name", "versions", "write_report"]
