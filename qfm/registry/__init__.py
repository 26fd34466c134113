"""The model registry side of MLflow: the pyfunc flavour that scores images (`pyfunc`), registered versions
and aliases (`versions`) and the promotion gate (`gate`). Imported only by `qfm promote`, by `qfm score
--model models:/...` and by a model server; the rest of the library never imports MLflow."""
