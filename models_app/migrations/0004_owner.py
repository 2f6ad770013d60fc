import django.db.models.deletion
from django.conf import settings
from django.db import migrations, models


class Migration(migrations.Migration):
    """created_by becomes owner (kept, not dropped): who may cancel or delete the record."""

    dependencies = [
        ("models_app", "0003_quantization_figures"),
        migrations.swappable_dependency(settings.AUTH_USER_MODEL),
    ]

    operations = [
        migrations.RenameField(model_name="model", old_name="created_by", new_name="owner"),
        migrations.AlterField(
            model_name="model",
            name="owner",
            field=models.ForeignKey(
                blank=True, null=True, on_delete=django.db.models.deletion.SET_NULL, related_name="+",
                to=settings.AUTH_USER_MODEL,
            ),
        ),
    ]
