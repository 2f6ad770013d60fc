"""PostgreSQL-only indexes: GIN on architecture_config (JSON containment queries) and a
full-text index on name + architecture. Other databases skip this migration's SQL."""

from django.db import migrations

INDEXES = [
    (
        "model_arch_config_gin",
        "CREATE INDEX IF NOT EXISTS model_arch_config_gin ON models_app_model USING GIN (architecture_config)",
    ),
    (
        "model_name_arch_fts",
        "CREATE INDEX IF NOT EXISTS model_name_arch_fts ON models_app_model USING GIN "
        "(to_tsvector('simple', coalesce(name, '') || ' ' || coalesce(architecture, '')))",
    ),
]


def create(apps, schema_editor):
    if schema_editor.connection.vendor != "postgresql":
        return
    for _, sql in INDEXES:
        schema_editor.execute(sql)


def drop(apps, schema_editor):
    if schema_editor.connection.vendor != "postgresql":
        return
    for name, _ in INDEXES:
        schema_editor.execute(f"DROP INDEX IF EXISTS {name}")


class Migration(migrations.Migration):
    dependencies = [("models_app", "0001_initial")]
    operations = [migrations.RunPython(create, drop)]
