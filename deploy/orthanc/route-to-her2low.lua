-- Orthanc auto-routing to the her2low DICOM node (Orthanc Lua scripting).
-- Every stable MR or SEG series is sent once it has been quiet for StableAge seconds.
-- Orthanc fires OnStableSeries again on a late instance and re-sends the whole series;
-- the node stores only what is new and re-runs the analysis.
-- Results the node sends back (SR, SEG, KOS, and parametric maps, which are MR like their
-- source) carry the node's equipment identity (Manufacturer and Manufacturer's Model Name, as
-- the node itself checks them): they are never routed to it again.
function OnStableSeries(seriesId, tags, metadata)
  local shared = ParseJson(RestApiGet('/series/' .. seriesId .. '/shared-tags?simplify'))
  if shared['Manufacturer'] == 'her2low-cds' and
     shared['ManufacturerModelName'] == 'her2low DKI node' then
    return
  end
  if tags['Modality'] == 'MR' or tags['Modality'] == 'SEG' then
    -- DumpJson(body) without the second argument: with `true` numbers become strings and
    -- Orthanc rejects the request.
    RestApiPost('/modalities/her2low/store',
                DumpJson({Resources = {seriesId}, Asynchronous = true}))
  end
end
