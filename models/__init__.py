from .detr import build


def build_model(args):
    """(model, criterion, postprocessors) from the options of main.get_args_parser(), with
    args.num_classes set (models.detr.build says which options the data decide)."""
    return build(args)
