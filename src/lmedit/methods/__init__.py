"""Editing methods. Each module registers its editor with ``@register_editor``; see ``base.Editor``."""
