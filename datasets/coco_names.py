"""COCO 2017 detection's category names by category id (1..90; the 80 ids in use).

DETR's COCO classifier has 91 outputs plus "no object": one per id 0..90, where 0 and the ten
unused ids (12, 26, 29, 30, 45, 66, 68, 69, 71, 83) never occur in the data.
"""

# the names of ids 1..90 in order, empty for the unused ids
_NAMES = (
    "person,bicycle,car,motorcycle,airplane,bus,train,truck,boat,traffic light,fire hydrant,,"
    "stop sign,parking meter,bench,bird,cat,dog,horse,sheep,cow,elephant,bear,zebra,giraffe,,"
    "backpack,umbrella,,,handbag,tie,suitcase,frisbee,skis,snowboard,sports ball,kite,"
    "baseball bat,baseball glove,skateboard,surfboard,tennis racket,bottle,,wine glass,cup,"
    "fork,knife,spoon,bowl,banana,apple,sandwich,orange,broccoli,carrot,hot dog,pizza,donut,"
    "cake,chair,couch,potted plant,bed,,dining table,,,toilet,,tv,laptop,mouse,remote,"
    "keyboard,cell phone,microwave,oven,toaster,sink,refrigerator,,book,clock,vase,scissors,"
    "teddy bear,hair drier,toothbrush"
)
COCO_CATEGORY_NAMES = {i: name for i, name in enumerate(_NAMES.split(","), start=1) if name}
