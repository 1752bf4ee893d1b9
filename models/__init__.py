from .detr import build


def build_model(args):
    """Build (model, criterion, postprocessors) from the options of main.get_args_parser()."""
    return build(args)
