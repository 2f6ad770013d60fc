from django.contrib import admin, messages

from . import jobs
from .errors import ServiceError
from .models import ApiToken


@admin.register(ApiToken)
class ApiTokenAdmin(admin.ModelAdmin):
    list_display = ("user", "name", "prefix", "created_at", "last_used_at")
    search_fields = ("user__username", "name", "prefix")
    readonly_fields = ("prefix", "created_at", "last_used_at")
    exclude = ("key_hash",)

    def has_add_permission(self, request):
        return False  # tokens are issued by `manage.py create_api_token`, which shows the value once


class TrackedRowAdmin(admin.ModelAdmin):
    """Rows that jobs drive (models, datasets, extractions) are made by the page, the API
    or the commands, never by an admin form (a row made here would have no job). The admin
    cancels, retries and deletes them through the same services, with the same checks."""

    delete_service = None  # the app's delete: (pk, user) -> bool, which also removes the files
    actions = ["cancel_selected", "retry_selected", "resume_selected", "delete_selected_with_files"]

    def has_add_permission(self, request):
        return False

    @admin.display(description="progress", ordering="progress")
    def progress_shown(self, row) -> str:
        return f"{row.progress:.1f}%"

    def has_delete_permission(self, request, obj=None):
        return False  # the action below also removes files and refuses running jobs

    def _each(self, request, queryset, action, done: str) -> None:
        count = 0
        for row in queryset:
            try:
                action(row)
                count += 1
            except ServiceError as exc:
                self.message_user(request, f"{row} ({row.pk}): {exc.message}", messages.WARNING)
        if count:
            self.message_user(request, f"{count} {done}.", messages.SUCCESS)

    @admin.action(description="Cancel the selected running jobs")
    def cancel_selected(self, request, queryset):
        self._each(request, queryset, lambda row: jobs.cancel(type(row), row.pk, request.user), "cancelled")

    @admin.action(description="Retry the selected failed or cancelled jobs (from the start)")
    def retry_selected(self, request, queryset):
        self._each(request, queryset, lambda row: jobs.retry(type(row), row.pk, request.user), "queued again")

    @admin.action(description="Resume the selected stopped jobs from what they kept")
    def resume_selected(self, request, queryset):
        self._each(request, queryset, lambda row: jobs.resume(type(row), row.pk, request.user), "resumed")

    @admin.action(description="Delete the selected records and their files")
    def delete_selected_with_files(self, request, queryset):
        """First a page that names every record and what goes with it; only its Yes deletes
        (as Django's own delete action asks before it deletes)."""
        if request.POST.get("post") != "yes":
            from django.contrib.admin import helpers
            from django.template.response import TemplateResponse

            return TemplateResponse(request, "admin/delete_with_files_confirmation.html", {
                **self.admin_site.each_context(request), "title": "Delete these records and their files?",
                "rows": list(queryset), "opts": self.model._meta, "action": "delete_selected_with_files",
                "action_checkbox_name": helpers.ACTION_CHECKBOX_NAME,
            })  # fmt: skip
        self._each(request, queryset, lambda row: type(self).delete_service(row.pk, request.user), "deleted")
        return None
