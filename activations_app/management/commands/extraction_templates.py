import json

from django.core.management.base import BaseCommand

from activations_app import services
from mistudio.commands import acting_user, add_user_argument, service_call


class Command(BaseCommand):
    help = ("List the acting user's extraction templates (favourites first), or favourite or delete one. "
            "Save one with extract_activations MODEL --layers … --hooks … --save-template NAME.")  # fmt: skip

    def add_arguments(self, parser):
        action = parser.add_mutually_exclusive_group()
        action.add_argument("--favourite", metavar="NAME_OR_ID")
        action.add_argument("--unfavourite", metavar="NAME_OR_ID")
        action.add_argument("--delete", metavar="NAME_OR_ID")
        parser.add_argument("--json", action="store_true", help="One JSON object per template.")
        add_user_argument(parser)

    def handle(self, *args, **options):
        user = acting_user(options)
        if options["delete"]:
            template = service_call(services.delete_template, options["delete"], user)
            self.stdout.write(f"{template.id}  {template.name}  deleted")
            return
        for flag, on in (("favourite", True), ("unfavourite", False)):
            if options[flag]:
                template = service_call(services.favourite_template, options[flag], user, on)
                self.stdout.write(json.dumps(template.as_dict()) if options["json"] else f"{template.id}  {template.name}  "
                                  f"{'favourite' if on else 'not a favourite'}")  # fmt: skip
                return
        for template in services.list_templates(user):
            if options["json"]:
                self.stdout.write(json.dumps(template.as_dict()))
            else:
                request = template.request
                self.stdout.write(f"{'★' if template.favourite else ' '} {template.id}  {template.name}  layers "
                                  f"{','.join(map(str, request['layers']))}  {','.join(request['hook_types'])}  "
                                  f"{request['max_samples']} × {request['seq_len']}")  # fmt: skip
