"""What the database says about the target table: the table resolved (`target`), its shape
read from the catalog (`describe`), the copy risks of an UPDATE (`risks`) and the indexes the
job reads due rows through (`indexes`).
"""
